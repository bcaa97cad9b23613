#!/bin/sh
# hwkms package, before removal (deb: remove, rpm: 0) or upgrade (deb: upgrade,
# rpm: 1; nothing to do then). On removal, stop and disable the unit while its file
# still exists.
set -e
case "$1" in
remove|0)
	if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
		systemctl stop hwkms.service >/dev/null 2>&1 || true
		systemctl disable hwkms.service >/dev/null 2>&1 || true
	fi
	;;
esac
exit 0
