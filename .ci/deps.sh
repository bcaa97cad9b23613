#!/usr/bin/env bash
# Installs the system packages hwkms's dev mode and tests need, if missing.
# Used by `make run`, `make test` and .ci/run. As root it installs with apt-get;
# otherwise it prints the command to run and fails.
set -euo pipefail

pkgs=(softhsm2 swtpm swtpm-tools systemd) # systemd: systemd-analyze verify of deploy/systemd
missing=()
for p in "${pkgs[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
		missing+=("$p")
	fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
	echo "hwkms needs these Debian packages: ${missing[*]}" >&2
	echo "install them with: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
	exit 1
fi
echo "installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
