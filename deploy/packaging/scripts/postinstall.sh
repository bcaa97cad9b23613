#!/bin/sh
# hwkms package, after install or upgrade (deb: configure, rpm: 1 install, 2 upgrade).
# Only tells systemd about the unit. It never enables or starts hwkms: the example
# /etc/hwkms/hwkms.yaml names a token, a PIN file and keys this host does not have
# yet. Write the config, run `hwkms doctor --config /etc/hwkms/hwkms.yaml`, then
# `systemctl enable --now hwkms`. An upgrade does not restart a running hwkms either
# (kube-apiserver depends on it; restart it when you choose).
set -e
case "$1" in
configure|1|2)
	if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
		systemctl daemon-reload || true
		if systemctl is-active --quiet hwkms.service; then
			echo "hwkms: hwkms.service still runs the previous binary; run 'systemctl restart hwkms' when convenient"
		fi
	fi
	;;
esac
exit 0
