package deploy

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// imageSpec is deploy/packaging/image.json, which cmd/mkimage builds the image from.
type imageSpec struct {
	Comment    string            `json:"comment"`
	Repository string            `json:"repository"`
	Binary     string            `json:"binary"`
	Entrypoint []string          `json:"entrypoint"`
	Cmd        []string          `json:"cmd"`
	User       string            `json:"user"`
	Env        []string          `json:"env"`
	Dirs       map[string]string `json:"dirs"`
	Symlinks   map[string]string `json:"symlinks"`
	Passwd     string            `json:"passwd"`
	Group      string            `json:"group"`
}

func readImageSpec(t *testing.T) *imageSpec {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("packaging", "image.json"))
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var s imageSpec
	if err := dec.Decode(&s); err != nil {
		t.Fatalf("packaging/image.json: %v", err)
	}
	return &s
}

// env returns the value of NAME in a KEY=VALUE list.
func env(list []string, name string) string {
	for _, kv := range list {
		if k, v, ok := strings.Cut(kv, "="); ok && k == name {
			return v
		}
	}
	return ""
}

// podMount is one volumeMount with the hostPath volume behind it.
type podMount struct {
	name, mountPath, hostPath, hostType string
	readOnly                            bool
}

func staticPod(t *testing.T) (*pod, []podMount) {
	t.Helper()
	var p pod
	readStrict(t, filepath.Join("kubernetes", "hwkms-static-pod.yaml"), &p)
	if len(p.Spec.Containers) != 1 {
		t.Fatalf("%d containers", len(p.Spec.Containers))
	}
	vols := map[string]podMount{}
	for _, v := range p.Spec.Volumes {
		if v.HostPath != nil {
			vols[v.Name] = podMount{name: v.Name, hostPath: v.HostPath.Path, hostType: v.HostPath.Type}
		}
	}
	var mounts []podMount
	for _, m := range p.Spec.Containers[0].VolumeMounts {
		pm, ok := vols[m.Name]
		if !ok {
			t.Fatalf("mount %s names no hostPath volume", m.Name)
		}
		pm.mountPath, pm.readOnly = m.MountPath, m.ReadOnly
		mounts = append(mounts, pm)
	}
	return &p, mounts
}

// within reports whether p is dir or below it.
func within(p, dir string) bool {
	return p == dir || strings.HasPrefix(p, strings.TrimSuffix(dir, "/")+"/")
}

// mountFor returns the innermost mount p lies in, or nil.
func mountFor(mounts []podMount, p string) *podMount {
	var best *podMount
	for i, m := range mounts {
		if within(p, m.mountPath) && (best == nil || len(m.mountPath) > len(best.mountPath)) {
			best = &mounts[i]
		}
	}
	return best
}

// TestManifestMatchesImageSpec: the static pod runs the image make image builds, at
// the binary's path in it, and mounts from the host, at the same paths, every file the
// config it runs (deploy/hwkms.yaml stands for /etc/hwkms/hwkms.yaml) names: the
// PKCS#11 module, its libraries' directory (the image's LD_LIBRARY_PATH), PIN, TPM
// device, blob and auth files, and the socket directory; and no mount hides the binary.
func TestManifestMatchesImageSpec(t *testing.T) {
	s := readImageSpec(t)
	p, mounts := staticPod(t)
	c := p.Spec.Containers[0]

	if len(s.Entrypoint) != 1 || s.Entrypoint[0] != s.Binary {
		t.Errorf("image.json entrypoint %q is not the binary %s", s.Entrypoint, s.Binary)
	}
	if len(c.Command) == 0 || c.Command[0] != s.Binary {
		t.Errorf("static pod runs %q; the image has hwkms at %s", c.Command, s.Binary)
	}
	checkCommandLine(t, "image.json entrypoint+cmd", append(slices.Clone(s.Entrypoint), s.Cmd...))
	// hwkms:TAG or REGISTRY/.../hwkms:TAG; make image names it s.Repository:VERSION.
	ref := regexp.MustCompile(`^(?:[a-z0-9.-]+(?::[0-9]+)?/)*([a-z0-9._-]+):([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})$`).FindStringSubmatch(c.Image)
	if ref == nil || ref[1] != s.Repository || ref[2] == "latest" {
		t.Errorf("image %q: want %s:VERSION (optionally behind a registry), as make image tags it", c.Image, s.Repository)
	}

	// Every config path hwkms opens in the pod is the same path on the host.
	samePath := func(what, p string, wantRO bool) {
		t.Helper()
		m := mountFor(mounts, p)
		if m == nil {
			t.Errorf("%s %s is in no hostPath mount of the static pod", what, p)
			return
		}
		if rel := strings.TrimPrefix(p, m.mountPath); m.hostPath+rel != p {
			t.Errorf("%s %s comes from host path %s%s: hwkms.yaml must name the same file for the unit and the pod", what, p, m.hostPath, rel)
		}
		if wantRO && !m.readOnly {
			t.Errorf("%s %s: mount %s should be readOnly", what, p, m.name)
		}
	}
	var cfgFile string
	for _, a := range c.Command {
		if v, ok := strings.CutPrefix(a, "--config="); ok {
			cfgFile = v
		}
	}
	if cfgFile == "" {
		t.Fatal("the static pod passes no --config=FILE")
	}
	samePath("--config", cfgFile, true)
	cfg := exampleConfig(t)
	samePath("socket.path", cfg.Socket.Path, false)
	pkcs11 := 0
	for i, k := range cfg.Keys {
		where := fmt.Sprintf("keys[%d]", i)
		switch {
		case k.PKCS11 != nil:
			pkcs11++
			samePath(where+".pkcs11.module", k.PKCS11.Module, true)
			if m := mountFor(mounts, k.PKCS11.Module); m != nil && m.mountPath == k.PKCS11.Module && m.hostType != "File" {
				t.Errorf("module volume %s has type %q, want File", m.name, m.hostType)
			}
			if k.PKCS11.PINFile != "" {
				samePath(where+".pkcs11.pinFile", k.PKCS11.PINFile, true)
			}
		case k.TPM != nil:
			if strings.HasPrefix(k.TPM.Device, "/dev/") {
				samePath(where+".tpm.device", k.TPM.Device, false)
			}
			for what, f := range map[string]string{"blobFile": k.TPM.BlobFile, "authFile": k.TPM.AuthFile} {
				if f != "" {
					samePath(where+".tpm."+what, f, false)
				}
			}
		}
	}
	if pkcs11 > 0 {
		lib := env(s.Env, "LD_LIBRARY_PATH")
		if m := mountFor(mounts, lib); lib == "" || m == nil || m.mountPath != lib || !m.readOnly || m.hostType != "Directory" {
			t.Errorf("a PKCS#11 key needs the module's libraries: the image's LD_LIBRARY_PATH %q must be a readOnly Directory mount", lib)
		}
		for _, name := range []string{"pkcs11-conf", "pkcs11-module"} {
			if !slices.ContainsFunc(mounts, func(m podMount) bool { return m.name == name }) {
				t.Errorf("no %s mount (the vendor's configuration and module come from the host)", name)
			}
		}
	}
	for _, m := range mounts {
		if within(s.Binary, m.mountPath) {
			t.Errorf("mount %s at %s hides the image's %s", m.name, m.mountPath, s.Binary)
		}
	}
}

// TestManifestContainerfileMatchesImageSpec: deploy/Containerfile (the daemon build)
// puts the binary where make image does and runs it the same way.
func TestManifestContainerfileMatchesImageSpec(t *testing.T) {
	s := readImageSpec(t)
	data, err := os.ReadFile("Containerfile")
	if err != nil {
		t.Fatal(err)
	}
	cf := string(data)
	jsonArray := func(v []string) string {
		b, _ := json.Marshal(v)
		return strings.ReplaceAll(string(b), `","`, `", "`)
	}
	for _, want := range []string{
		"FROM golang:1.26-bookworm AS build\n",
		"CGO_ENABLED=1 go build",
		"FROM debian:12-slim\n",
		"COPY --from=build /out/hwkms " + s.Binary + "\n",
		"ENV LD_LIBRARY_PATH=" + env(s.Env, "LD_LIBRARY_PATH") + "\n",
		"USER " + s.User + "\n",
		"ENTRYPOINT " + jsonArray(s.Entrypoint) + "\n",
		"CMD " + jsonArray(s.Cmd) + "\n",
	} {
		if !strings.Contains(cf, want) {
			t.Errorf("Containerfile lacks %q", want)
		}
	}
}

// imageFS is the filesystem of an image: the layers of a docker/OCI archive applied in
// order.
type imageFS struct {
	entries map[string]*tar.Header
	data    map[string][]byte // regular files' contents
}

// resolve follows symbolic links inside the image (absolute targets are relative to
// the image root) and returns the final path, or an error if it does not exist.
func (f *imageFS) resolve(p string) (string, *tar.Header, error) {
	for hops := 0; hops < 40; hops++ {
		parts := strings.Split(strings.TrimPrefix(path.Clean(p), "/"), "/")
		cur, restart := "/", false
		for i, part := range parts {
			cur = path.Join(cur, part)
			h, ok := f.entries[cur]
			if !ok {
				return "", nil, fmt.Errorf("%s: %s does not exist in the image", p, cur)
			}
			if h.Typeflag == tar.TypeSymlink {
				target := h.Linkname
				if !path.IsAbs(target) {
					target = path.Join(path.Dir(cur), target)
				}
				p, restart = path.Join(append([]string{target}, parts[i+1:]...)...), true
				break
			}
			if i == len(parts)-1 {
				return cur, h, nil
			}
		}
		if !restart {
			return "", nil, fmt.Errorf("%s: empty path", p)
		}
	}
	return "", nil, fmt.Errorf("%s: too many symbolic links", p)
}

// readImageArchive reads a docker archive (manifest.json) and applies its layers.
func readImageArchive(t *testing.T, file string) (*imageFS, map[string]any, []string) {
	t.Helper()
	blobs := map[string][]byte{}
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		if h.Typeflag == tar.TypeReg {
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			blobs[h.Name] = b
		}
	}
	var manifest []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	if err := json.Unmarshal(blobs["manifest.json"], &manifest); err != nil || len(manifest) != 1 {
		t.Fatalf("%s: manifest.json: %v (%d images)", file, err, len(manifest))
	}
	m := manifest[0]
	var cfg map[string]any
	if err := json.Unmarshal(blobs[m.Config], &cfg); err != nil {
		t.Fatalf("%s: config %s: %v", file, m.Config, err)
	}
	ifs := &imageFS{entries: map[string]*tar.Header{"/": {Typeflag: tar.TypeDir, Mode: 0o755}}, data: map[string][]byte{}}
	for _, l := range m.Layers {
		zr, err := gzip.NewReader(bytes.NewReader(blobs[l]))
		if err != nil {
			t.Fatalf("%s: layer %s: %v", file, l, err)
		}
		lr := tar.NewReader(zr)
		for {
			h, err := lr.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s: layer %s: %v", file, l, err)
			}
			p := path.Clean("/" + h.Name)
			if base := path.Base(p); strings.HasPrefix(base, ".wh.") {
				gone := path.Join(path.Dir(p), strings.TrimPrefix(base, ".wh."))
				for q := range ifs.entries {
					if within(q, gone) {
						delete(ifs.entries, q)
					}
				}
				continue
			}
			ifs.entries[p] = h
			if h.Typeflag == tar.TypeReg {
				b, err := io.ReadAll(lr)
				if err != nil {
					t.Fatal(err)
				}
				ifs.data[p] = b
			}
		}
	}
	return ifs, cfg, m.RepoTags
}

// TestManifestAgainstImageArchive checks the static pod against the image archive that
// make image wrote (HWKMS_IMAGE=dist/hwkms-image-VERSION.tar; .ci/package-check.sh sets
// it): the image's config is image.json's; the pod's command is an executable file of
// the image; its ELF interpreter and every library it needs are in the image; and no
// mount of the pod hides any of them.
func TestManifestAgainstImageArchive(t *testing.T) {
	file := os.Getenv("HWKMS_IMAGE")
	if file == "" {
		t.Skip("HWKMS_IMAGE unset: make image, then HWKMS_IMAGE=dist/hwkms-image-VERSION.tar (.ci/package-check.sh runs this test so)")
	}
	s := readImageSpec(t)
	p, mounts := staticPod(t)
	ifs, cfg, tags := readImageArchive(t, file)

	if len(tags) != 1 || !strings.HasPrefix(tags[0], s.Repository+":") {
		t.Errorf("archive tags %q, want %s:VERSION", tags, s.Repository)
	}
	cc, _ := cfg["config"].(map[string]any)
	for k, want := range map[string]any{"Entrypoint": s.Entrypoint, "Cmd": s.Cmd, "User": s.User, "Env": s.Env} {
		got, _ := json.Marshal(cc[k])
		w, _ := json.Marshal(want)
		if !bytes.Equal(got, w) {
			t.Errorf("image config %s = %s, image.json says %s", k, got, w)
		}
	}
	if cfg["os"] != "linux" || cfg["architecture"] != runtime.GOARCH {
		t.Errorf("image platform %v/%v", cfg["os"], cfg["architecture"])
	}

	cmd := p.Spec.Containers[0].Command[0]
	bin, h, err := ifs.resolve(cmd)
	if err != nil {
		t.Fatalf("the static pod's command: %v", err)
	}
	if h.Typeflag != tar.TypeReg || h.Mode&0o111 == 0 {
		t.Fatalf("%s is not an executable file in the image (mode %o)", bin, h.Mode)
	}
	needed := []string{cmd}
	ef, err := elf.NewFile(bytes.NewReader(ifs.data[bin]))
	if err != nil {
		t.Fatalf("%s: %v", bin, err)
	}
	for _, prog := range ef.Progs {
		if prog.Type == elf.PT_INTERP {
			b, err := io.ReadAll(prog.Open())
			if err != nil {
				t.Fatal(err)
			}
			interp := strings.TrimRight(string(b), "\x00")
			if _, _, err := ifs.resolve(interp); err != nil {
				t.Errorf("ELF interpreter: %v", err)
			}
			needed = append(needed, interp)
		}
	}
	libs, err := ef.ImportedLibraries()
	if err != nil {
		t.Fatal(err)
	}
	if len(libs) == 0 {
		t.Error("the binary needs no shared library: is it built with cgo?")
	}
	triplet := map[string]string{"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}[runtime.GOARCH]
	for _, lib := range libs {
		found := ""
		for _, dir := range []string{"/lib/" + triplet, "/usr/lib/" + triplet, "/lib", "/usr/lib", "/lib64", "/usr/lib64"} {
			if r, h, err := ifs.resolve(path.Join(dir, lib)); err == nil && h.Typeflag == tar.TypeReg {
				found = r
				needed = append(needed, path.Join(dir, lib), r)
				break
			}
		}
		if found == "" {
			t.Errorf("%s needs %s, which is in no library directory of the image", bin, lib)
		}
	}
	for _, n := range needed {
		r, _, _ := ifs.resolve(n)
		for _, m := range mounts {
			if within(n, m.mountPath) || (r != "" && within(r, m.mountPath)) {
				t.Errorf("mount %s at %s hides %s of the image", m.name, m.mountPath, n)
			}
		}
	}
	// The runtime creates a missing mount point (mkdir -p) before it makes the root
	// read-only; what exists of its path in the image must be directories (a symbolic
	// link on the way, such as /var/run -> ../run, must lead to one).
	for _, m := range mounts {
		cur := "/"
		for _, part := range strings.Split(strings.TrimPrefix(path.Dir(m.mountPath), "/"), "/") {
			cur = path.Join(cur, part)
			r, h, err := ifs.resolve(cur)
			if err != nil {
				break // missing from here on: created at mount time
			}
			if h.Typeflag != tar.TypeDir {
				t.Errorf("mount %s at %s: %s (%s) is not a directory in the image", m.name, m.mountPath, cur, r)
				break
			}
		}
	}
	if !strings.HasPrefix(string(ifs.data["/etc/passwd"]), "root:x:0:0:") {
		t.Errorf("/etc/passwd of the image has no root entry: %q", ifs.data["/etc/passwd"])
	}
}

// nfpmConfig is the part of deploy/packaging/nfpm.yaml the tests check.
type nfpmConfig struct {
	Contents []struct {
		Src      string `json:"src"`
		Dst      string `json:"dst"`
		Type     string `json:"type"`
		Packager string `json:"packager"`
		FileInfo struct {
			Mode  int    `json:"mode"`
			Owner string `json:"owner"`
			Group string `json:"group"`
		} `json:"file_info"`
	} `json:"contents"`
	Scripts map[string]string `json:"scripts"`
}

// TestDeployPackageContents: the packages install the binary where the unit's
// ExecStart and the image expect it, the unit where systemd looks for packaged units,
// the unit's Documentation= file, and the example config as a root-only conffile that
// upgrades keep; every source exists; the maintainer scripts never enable, start or
// restart hwkms.
func TestDeployPackageContents(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("packaging", "nfpm.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var n nfpmConfig
	if err := yaml.Unmarshal(data, &n); err != nil {
		t.Fatalf("packaging/nfpm.yaml: %v", err)
	}
	unit := unitDirectives(t, filepath.Join("systemd", "hwkms.service"))
	execBin := strings.Fields(unit["ExecStart"][0])[0]
	if s := readImageSpec(t); s.Binary != execBin {
		t.Errorf("the unit runs %s, the image has %s", execBin, s.Binary)
	}
	doc := strings.TrimPrefix(unit["Documentation"][0], "file://")

	type want struct {
		src, typ string
		modes    []int
	}
	wants := map[string]want{
		execBin:                                 {"bin/hwkms", "", []int{0o755}},
		"/lib/systemd/system/hwkms.service":     {"deploy/systemd/hwkms.service", "", []int{0o644}},
		"/usr/lib/systemd/system/hwkms.service": {"deploy/systemd/hwkms.service", "", []int{0o644}},
		"/etc/hwkms/hwkms.yaml":                 {"deploy/hwkms.yaml", "config|noreplace", []int{0o640, 0o600}},
		"/etc/hwkms":                            {"", "dir", []int{0o750, 0o700}},
		doc:                                     {"docs/" + path.Base(doc), "", []int{0o644}},
	}
	seen := map[string]bool{}
	for _, c := range n.Contents {
		if c.Src != "" {
			if _, err := os.Stat(filepath.Join("..", c.Src)); err != nil && c.Src != "bin/hwkms" {
				t.Errorf("nfpm source %s: %v", c.Src, err)
			}
		}
		if c.FileInfo.Owner != "" && c.FileInfo.Owner != "root" || c.FileInfo.Group != "" && c.FileInfo.Group != "root" {
			t.Errorf("%s owned by %s:%s, want root", c.Dst, c.FileInfo.Owner, c.FileInfo.Group)
		}
		if strings.HasPrefix(c.Dst, "/etc/hwkms") && c.FileInfo.Mode&0o007 != 0 {
			t.Errorf("%s mode %o is world-accessible", c.Dst, c.FileInfo.Mode)
		}
		w, ok := wants[c.Dst]
		if !ok {
			continue
		}
		seen[c.Dst] = true
		if c.Src != w.src || c.Type != w.typ || !slices.Contains(w.modes, c.FileInfo.Mode) {
			t.Errorf("%s: src %q type %q mode %o; want src %q type %q mode one of %o", c.Dst, c.Src, c.Type, c.FileInfo.Mode, w.src, w.typ, w.modes)
		}
	}
	for dst := range wants {
		if !seen[dst] {
			t.Errorf("the packages do not install %s", dst)
		}
	}
	for _, k := range []string{"preinstall", "postinstall", "preremove", "postremove"} {
		script := n.Scripts[k]
		fi, err := os.Stat(filepath.Join("..", script))
		if err != nil {
			t.Errorf("%s script: %v", k, err)
			continue
		}
		if fi.Mode()&0o111 == 0 {
			t.Errorf("%s is not executable", script)
		}
		body, _ := os.ReadFile(filepath.Join("..", script))
		for _, l := range strings.Split(string(body), "\n") {
			if l = strings.TrimSpace(l); strings.HasPrefix(l, "#") {
				continue
			}
			// systemctl in command position (not inside an echo's message).
			if regexp.MustCompile(`(^|[;&|]|\bthen|\bdo|\bif|!)\s*systemctl\s+(-\S+\s+)*(enable|start|restart|reload-or-restart|try-restart)\b`).MatchString(l) {
				t.Errorf("%s: %q: the package must never (re)start or enable hwkms", script, l)
			}
		}
	}
}
