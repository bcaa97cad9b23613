#!/bin/sh
# hwkms package, after removal (deb: remove|purge, rpm: 0) or upgrade.
# Never deletes what the operator made: /var/lib/hwkms holds TPM KEK blobs and
# /etc/hwkms the PIN and auth files; without them the Secrets in etcd cannot be
# decrypted. dpkg --purge removes the packaged config and the directories if empty.
set -e
case "$1" in
remove|purge|0)
	if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
		systemctl daemon-reload || true
	fi
	;;
esac
if [ "$1" = purge ]; then
	for d in /etc/hwkms /var/lib/hwkms; do
		if [ -d "$d" ] && [ -n "$(ls -A "$d" 2>/dev/null)" ]; then
			echo "hwkms: kept $d (not empty: keys, PIN or auth files); remove it yourself once no data needs it"
		fi
	done
fi
exit 0
