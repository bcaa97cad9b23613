#!/usr/bin/env bash
# Packaging check, run by .ci/run as root on a disposable Debian 12 host (CI=true).
#
#  0. cmd/mkimage's own tests (a module of its own: make test does not reach it).
#  1. make package + make image for VERSION $V1, make package for $V2 (each in its own
#     dist dir); SHA256SUMS verify; the SBOMs describe the artifacts they sit beside.
#  2. The .rpm: modes, owners, %config(noreplace), scriptlets (rpm -qp; not installed).
#  3. dpkg -i the $V1 .deb: owner and mode of every installed file, the unit verifies
#     with the installed binary and is neither enabled nor started, `hwkms version`,
#     and `/usr/bin/hwkms doctor` against a SoftHSM2 token made in a temp dir.
#  4. Edit /etc/hwkms/hwkms.yaml, dpkg -i the $V2 .deb: the edit is kept, the binary
#     is $V2. dpkg -r keeps only the conffile; dpkg -P leaves nothing of the package.
#  5. The image: unpack its layers, chroot into them, run /usr/bin/hwkms version, and
#     key create + doctor against SoftHSM2 with the module (and the libraries it needs
#     beyond the image's libc) copied in where the static pod mounts them; then the
#     deploy tests check the static pod against this image (HWKMS_IMAGE).
#
# Refuses to run if a hwkms package or /usr/bin/hwkms is already there (not its own
# to remove); removes what it installed on any exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/go/bin:$HOME/go/bin:$PATH"
export CI="${CI:-true}"

V1=0.0.1-ci1
V2=0.0.1-ci2
ARCH=$(go env GOARCH)

step() { printf '\n== package-check: %s\n' "$*"; }
fail() {
	echo "package-check: FAIL: $*" >&2
	exit 1
}

[ "$(id -u)" -eq 0 ] || fail "must run as root (dpkg -i, chroot)"
for t in dpkg dpkg-deb softhsm2-util chroot ldd systemd-analyze sha256sum tar; do
	command -v "$t" >/dev/null || fail "$t is missing (Debian 12 host with softhsm2 and systemd, see .ci/deps.sh)"
done
# rpm inspects the .rpm; skopeo reads the image archive with containers/image, the
# library podman load uses.
for t in rpm skopeo; do
	if ! command -v $t >/dev/null; then
		echo "installing $t" >&2
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $t >/dev/null
	fi
done
if dpkg-query -W -f='${Status}' hwkms 2>/dev/null | grep -q 'installed\|config-files'; then
	fail "a hwkms package is already on this host; remove it first (dpkg -P hwkms)"
fi
[ ! -e /usr/bin/hwkms ] || fail "/usr/bin/hwkms exists and belongs to no hwkms package"
CHROOT=$(command -v chroot) # env -i below clears PATH

WORK=$(mktemp -d /tmp/hwkms-package-check.XXXXXX)
installed=0
cleanup() {
	rc=$?
	if [ "$installed" = 1 ]; then
		dpkg -P hwkms >/dev/null 2>&1 || echo "package-check: could not purge hwkms" >&2
	fi
	rm -rf "$WORK"
	exit $rc
}
trap cleanup EXIT

# mode_is PATH MODE OWNER:GROUP
mode_is() {
	local got
	got=$(stat -c '%a %U:%G' "$1") || fail "$1 missing"
	[ "$got" = "$2 $3" ] || fail "$1 is $got, want $2 $3"
	echo "ok  $1 $got"
}

# new_token DIR TOKENDIR_IN_CONF: a SoftHSM2 config DIR/softhsm2.conf whose tokendir
# is DIR/tokens, or TOKENDIR_IN_CONF if given (for a chroot), a token labelled
# hwkms-ci with random PINs, and DIR/pin (0600) holding the user PIN.
new_token() {
	local dir=$1 tokendir=${2:-$1/tokens}
	mkdir -p "$dir/tokens"
	printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
		"$dir/tokens" >"$dir/softhsm2.conf"
	local pin so
	pin=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
	so=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
	(umask 077 && printf '%s' "$pin" >"$dir/pin")
	SOFTHSM2_CONF="$dir/softhsm2.conf" softhsm2-util --init-token --free --label hwkms-ci \
		--so-pin "$so" --pin "$pin" >/dev/null
	if [ "$tokendir" != "$dir/tokens" ]; then
		printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
			"$tokendir" >"$dir/softhsm2.conf"
	fi
}

# write_config FILE SOCKET PINFILE: a one-key SoftHSM2 config.
write_config() {
	(umask 077 && cat >"$1" <<EOF
socket:
  path: $2
keys:
  - pkcs11:
      module: /usr/lib/softhsm/libsofthsm2.so
      tokenLabel: hwkms-ci
      pinFile: $3
      keyLabel: hwkms-ci-kek
      sessions: 2
EOF
	)
}

start=$(date +%s)

step "cmd/mkimage (its own module): vet and tests"
(cd cmd/mkimage && go vet ./... && go test -race -count=1 ./...) || fail "cmd/mkimage"

step "build $V1 (package, image) and $V2 (package)"
make -s package image VERSION=$V1 DIST="$WORK/dist1" >"$WORK/make1.log" 2>&1 || { cat "$WORK/make1.log"; fail "make package image VERSION=$V1"; }
make -s package VERSION=$V2 DIST="$WORK/dist2" >"$WORK/make2.log" 2>&1 || { cat "$WORK/make2.log"; fail "make package VERSION=$V2"; }
DEB1=$WORK/dist1/hwkms_${V1}_${ARCH}.deb
DEB2=$WORK/dist2/hwkms_${V2}_${ARCH}.deb
RPM1=$(ls "$WORK"/dist1/hwkms-${V1}.*.rpm)
TAR1=$WORK/dist1/hwkms-image-${V1}.tar
for f in "$DEB1" "$DEB2" "$RPM1" "$TAR1" "$WORK/dist1/hwkms-image-${V1}/index.json"; do
	[ -f "$f" ] || fail "$f was not built"
done

step "SHA256SUMS and SBOMs"
for d in "$WORK/dist1" "$WORK/dist2"; do
	(cd "$d" && sha256sum --quiet -c SHA256SUMS) || fail "$d/SHA256SUMS does not verify"
	# Every file but SHA256SUMS is listed.
	want=$(cd "$d" && find . -type f ! -name SHA256SUMS | sed 's|^\./||' | LC_ALL=C sort)
	got=$(awk '{print $2}' "$d/SHA256SUMS")
	[ "$want" = "$got" ] || fail "$d/SHA256SUMS does not list exactly the files of $d"
done
for a in "$DEB1" "$RPM1" "$TAR1" "$WORK/dist1/hwkms-${V1}-linux-${ARCH}"; do
	s=$a.cdx.json
	[ -f "$s" ] || fail "no SBOM $s"
	grep -q '"bomFormat": "CycloneDX"' "$s" || fail "$s is not CycloneDX JSON"
	grep -q '"name": "github.com/miekg/pkcs11"' "$s" || fail "$s does not list github.com/miekg/pkcs11"
done
for a in "$DEB1" "$RPM1"; do
	grep -q "\"content\": \"$(sha256sum "$a" | cut -d' ' -f1)\"" "$a.cdx.json" || fail "$a.cdx.json does not carry the artifact's SHA-256"
done
grep -q '"name": "libc6"' "$TAR1.cdx.json" || fail "the image SBOM does not name the Debian libc6 package"
echo "ok  sums verify; SBOMs name the modules, the artifacts' hashes and the image's libc6"

step "image archive: docker-archive and oci-archive (skopeo, as podman load reads them)"
for transport in docker-archive oci-archive; do
	rm -rf "$WORK/copy"
	skopeo copy -q "$transport:$TAR1" "dir:$WORK/copy" || fail "skopeo cannot read $TAR1 as $transport"
	skopeo inspect --config "$transport:$TAR1" | grep -q '"/usr/bin/hwkms"' || fail "$transport: no /usr/bin/hwkms entrypoint"
	echo "ok  $transport: $(ls "$WORK/copy" | wc -l) blobs copied, entrypoint /usr/bin/hwkms"
done
tar -xOf "$TAR1" index.json | grep -q "\"io.containerd.image.name\": *\"docker.io/library/hwkms:$V1\"" ||
	fail "index.json does not name docker.io/library/hwkms:$V1 (the name ctr import gives it)"
tar -xOf "$TAR1" manifest.json | grep -q "\"RepoTags\":\[\"hwkms:$V1\"\]" || fail "manifest.json does not tag hwkms:$V1 (docker load)"

step "rpm contents (rpm -qp)"
rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILEFLAGS:fflags} %{FILENAMES}\n]' "$RPM1" >"$WORK/rpm.txt"
cat "$WORK/rpm.txt"
grep -qx -- '-rwxr-xr-x root:root  /usr/bin/hwkms' "$WORK/rpm.txt" || fail "rpm: /usr/bin/hwkms"
grep -qx -- '-rw-r----- root:root cn /etc/hwkms/hwkms.yaml' "$WORK/rpm.txt" || fail "rpm: /etc/hwkms/hwkms.yaml must be 0640 %config(noreplace)"
grep -qx -- '-rw-r--r-- root:root  /usr/lib/systemd/system/hwkms.service' "$WORK/rpm.txt" || fail "rpm: unit"
rpm -qp --scripts "$RPM1" | grep -E '^\s*systemctl (enable|start|restart)' && fail "rpm scriptlets must not enable or start hwkms"
rpm -qp --requires "$RPM1" | grep -q '^glibc' || fail "rpm does not require glibc"

step "dpkg -i $V1"
dpkg -i "$DEB1" </dev/null
installed=1
[ "$(dpkg-query -W -f='${Version}' hwkms)" = "0.0.1~ci1" ] || fail "installed version $(dpkg-query -W -f='${Version}' hwkms)"
mode_is /usr/bin/hwkms 755 root:root
mode_is /lib/systemd/system/hwkms.service 644 root:root
mode_is /etc/hwkms 750 root:root
mode_is /etc/hwkms/hwkms.yaml 640 root:root
mode_is /var/lib/hwkms 700 root:root
[ "$(dpkg-query -W -f='${Conffiles}' hwkms | awk 'NF {print $1}')" = /etc/hwkms/hwkms.yaml ] || fail "conffiles: $(dpkg-query -W -f='${Conffiles}' hwkms)"
# Every path the package installed: root-owned, nothing group/world-writable (but
# links), nothing under /etc/hwkms world-readable.
while read -r p; do
	[ -e "$p" ] || [ -L "$p" ] || fail "dpkg -L lists $p, which is missing"
	read -r mode owner <<<"$(stat -c '%a %U:%G' "$p")"
	[ "$owner" = root:root ] || fail "$p is owned by $owner"
	[ -L "$p" ] || [ $((8#$mode & 8#022)) -eq 0 ] || fail "$p is group/world-writable ($mode)"
	case $p in /etc/hwkms/*) [ $((8#$mode & 8#007)) -eq 0 ] || fail "$p is world-accessible ($mode)" ;; esac
done < <(dpkg -L hwkms | grep -v '^/\.$')
echo "ok  every file of dpkg -L hwkms: root:root, not group/world-writable"
out=$(/usr/bin/hwkms version)
[ "$(head -1 <<<"$out")" = "hwkms $V1" ] || fail "hwkms version: $out"
grep -qx "commit: $(git rev-parse HEAD)" <<<"$out" || fail "hwkms version has no commit line for HEAD: $out"
grep -q '^dep: github.com/miekg/pkcs11 ' <<<"$out" || fail "hwkms version lists no modules"
echo "ok  $(head -2 <<<"$out" | tr '\n' ' ')"
# The installed unit, with the installed binary: verify finds /usr/bin/hwkms.
vout=$(systemd-analyze verify /lib/systemd/system/hwkms.service 2>&1) || fail "systemd-analyze verify: $vout"
[ -z "$vout" ] || fail "systemd-analyze verify: $vout"
ls /etc/systemd/system/*/hwkms.service >/dev/null 2>&1 && fail "the package enabled hwkms.service"
if [ -d /run/systemd/system ] && systemctl is-active --quiet hwkms.service; then fail "the package started hwkms.service"; fi
echo "ok  unit verifies with /usr/bin/hwkms; not enabled, not started"

step "/usr/bin/hwkms doctor against SoftHSM2"
new_token "$WORK/hsm"
mkdir -p "$WORK/run"
write_config "$WORK/hsm/hwkms.yaml" "$WORK/run/kms.sock" "$WORK/hsm/pin"
export SOFTHSM2_CONF=$WORK/hsm/softhsm2.conf
/usr/bin/hwkms key create --config "$WORK/hsm/hwkms.yaml" >/dev/null
/usr/bin/hwkms doctor --config "$WORK/hsm/hwkms.yaml" || fail "doctor from /usr/bin/hwkms"
unset SOFTHSM2_CONF

step "edit the config, dpkg -i $V2 (upgrade)"
echo "# edited by package-check $$" >>/etc/hwkms/hwkms.yaml
sum_edited=$(sha256sum /etc/hwkms/hwkms.yaml | cut -d' ' -f1)
dpkg -i "$DEB2" </dev/null
[ "$(dpkg-query -W -f='${Version}' hwkms)" = "0.0.1~ci2" ] || fail "upgraded version $(dpkg-query -W -f='${Version}' hwkms)"
[ "$(sha256sum /etc/hwkms/hwkms.yaml | cut -d' ' -f1)" = "$sum_edited" ] || fail "the upgrade replaced the edited /etc/hwkms/hwkms.yaml"
ls /etc/hwkms/hwkms.yaml.dpkg-* 2>/dev/null && fail "the upgrade left dpkg copies of the config"
mode_is /etc/hwkms/hwkms.yaml 640 root:root
[ "$(/usr/bin/hwkms version | head -1)" = "hwkms $V2" ] || fail "after upgrade: $(/usr/bin/hwkms version | head -1)"
echo "ok  edited config kept, binary is $V2"

step "dpkg -r, dpkg -P"
dpkg -r hwkms </dev/null
for p in /usr/bin/hwkms /lib/systemd/system/hwkms.service /usr/share/doc/hwkms; do
	[ ! -e "$p" ] || fail "dpkg -r left $p"
done
[ -f /etc/hwkms/hwkms.yaml ] || fail "dpkg -r removed the conffile (only -P may)"
dpkg -P hwkms </dev/null
installed=0
for p in /etc/hwkms /var/lib/hwkms /usr/bin/hwkms /lib/systemd/system/hwkms.service /usr/share/doc/hwkms; do
	[ ! -e "$p" ] || fail "dpkg -P left $p"
done
if dpkg-query -W hwkms >/dev/null 2>&1; then fail "dpkg still knows hwkms: $(dpkg-query -W -f='${Status}' hwkms)"; fi
echo "ok  -r kept only the conffile; -P left nothing"

step "image: unpack, chroot, version, doctor"
ROOT=$WORK/root
mkdir -p "$ROOT"
layers=$(tar -xOf "$TAR1" manifest.json | sed -e 's/.*"Layers":\[\([^]]*\)\].*/\1/' | tr ',' '\n' | tr -d '"')
[ -n "$layers" ] || fail "no layers in $TAR1's manifest.json"
for l in $layers; do
	tar -xOf "$TAR1" "$l" | tar -xz -C "$ROOT"
done
out=$(env -i "$CHROOT" "$ROOT" /usr/bin/hwkms version)
[ "$(head -1 <<<"$out")" = "hwkms $V1" ] || fail "chroot hwkms version: $out"
echo "ok  chroot: $(head -1 <<<"$out")"
# What the static pod mounts from the host: the PKCS#11 module at the path the config
# names, the libraries it needs beyond the image's C runtime in /opt/pkcs11/lib
# (LD_LIBRARY_PATH of the image), the vendor's configuration and token store.
mod=/usr/lib/softhsm/libsofthsm2.so
install -D -m 0644 "$mod" "$ROOT$mod"
while read -r lib; do
	[ -e "$ROOT$lib" ] || install -D -m 0644 "$lib" "$ROOT/opt/pkcs11/lib/$(basename "$lib")"
done < <(ldd "$mod" | awk '$2 == "=>" && $3 ~ /^\// {print $3}')
mkdir -p "$ROOT/etc/softhsm" "$ROOT/var/lib/softhsm"
new_token "$WORK/chroot-hsm" /var/lib/softhsm/tokens
mv "$WORK/chroot-hsm/tokens" "$ROOT/var/lib/softhsm/tokens"
cp "$WORK/chroot-hsm/softhsm2.conf" "$ROOT/etc/softhsm/softhsm2.conf"
install -m 0600 "$WORK/chroot-hsm/pin" "$ROOT/etc/hwkms/pin"
write_config "$ROOT/etc/hwkms/hwkms.yaml" /var/run/hwkms/kms.sock /etc/hwkms/pin
in_image() { env -i PATH=/usr/bin:/bin LD_LIBRARY_PATH=/opt/pkcs11/lib "$CHROOT" "$ROOT" /usr/bin/hwkms "$@"; }
# Without the library directory the module cannot load: the pod's pkcs11-lib mount is
# what makes SoftHSM2 work in this image.
if nolib=$(env -i PATH=/usr/bin:/bin "$CHROOT" "$ROOT" /usr/bin/hwkms doctor --config /etc/hwkms/hwkms.yaml 2>&1); then
	fail "doctor passed without LD_LIBRARY_PATH: the image has more than libc"
fi
grep -q 'FAIL.*module' <<<"$nolib" || fail "doctor without the module's libraries: $nolib"
echo "ok  without /opt/pkcs11/lib on LD_LIBRARY_PATH the module does not load"
in_image key create --config /etc/hwkms/hwkms.yaml >/dev/null || fail "chroot hwkms key create"
in_image doctor --config /etc/hwkms/hwkms.yaml || fail "chroot hwkms doctor"

step "deploy tests against the image"
HWKMS_IMAGE=$TAR1 go test -count=1 -run 'Manifest|Image' ./deploy/

echo
echo "package-check: ok ($(($(date +%s) - start)) s)"
