#!/usr/bin/env bash
# Installs the system packages hwkms's dev mode and tests need, if missing.
# Used by `make run`, `make test` and .ci/run. As root it installs with apt-get;
# otherwise it prints the command to run and fails.
set -euo pipefail

pkgs=(softhsm2 swtpm swtpm-tools systemd) # systemd: systemd-analyze verify of deploy/systemd
# Other PKCS#11 implementations for softhsm/interop (docs/tokens.md): opencryptoki's
# soft token; tpm2-pkcs11 with tpm2_ptool, on swtpm through tpm2-abrmd (its TCTI
# library is only a Recommends) on a private dbus-daemon; the NSS softoken and
# certutil.
pkgs+=(opencryptoki libtpm2-pkcs11-1 libtpm2-pkcs11-tools tpm2-tools tpm2-abrmd libtss2-tcti-tabrmd0 dbus-daemon libnss3 libnss3-tools)
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
