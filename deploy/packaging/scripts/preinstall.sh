#!/bin/sh
# hwkms package, before install or upgrade (deb: install|upgrade, rpm: 1|2).
# The unit runs with SupplementaryGroups=tss (the TPM resource manager /dev/tpmrm0 is
# tss:tss 0660) and systemd refuses to start a unit naming an unknown group: make the
# system group when tpm2-tss has not. Never removed: it is tpm2-tss's group too.
set -e
case "$1" in
install|upgrade|1|2)
	if ! getent group tss >/dev/null 2>&1; then
		groupadd --system tss
	fi
	;;
esac
exit 0
