package main

import (
	"archive/tar"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// fakeLDD writes a script that prints out and exits with code, standing in for ldd.
func fakeLDD(t *testing.T, out string, code int) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "ldd")
	script := "#!/bin/sh\ncat <<'EOF'\n" + out + "EOF\nexit " + string(rune('0'+code)) + "\n"
	if err := os.WriteFile(p, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestSharedLibraries(t *testing.T) {
	tests := []struct {
		name    string
		out     string
		code    int
		want    []string
		wantErr string
	}{
		{
			name: "glibc binary",
			out: "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n" +
				"\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n",
			want: []string{"/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"},
		},
		{name: "missing library", out: "\tlibfoo.so.1 => not found\n", wantErr: "libfoo.so.1 not found"},
		{name: "static binary", out: "\tnot a dynamic executable\n", code: 1, wantErr: "needs cgo"},
		{name: "nothing named", out: "\tstatically linked\n", wantErr: "named no libraries"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := sharedLibraries(fakeLDD(t, tt.out, tt.code), "/bin/true")
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || !slices.Equal(got, tt.want) {
				t.Fatalf("got %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}

// TestCopyHostPathKeepsLinks: a library reached through a directory link and a file
// link (as /lib64/ld-linux-x86-64.so.2 on merged-/usr Debian) is copied as the same
// links plus the one regular file, at the paths the host has.
func TestCopyHostPathKeepsLinks(t *testing.T) {
	root := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "usr/lib/gnu"), 0o755))
	must(os.MkdirAll(filepath.Join(root, "usr/lib64"), 0o755))
	must(os.WriteFile(filepath.Join(root, "usr/lib/gnu/ld.so"), []byte("loader"), 0o755))
	must(os.Symlink("usr/lib", filepath.Join(root, "lib")))
	must(os.Symlink("usr/lib64", filepath.Join(root, "lib64")))
	must(os.Symlink(filepath.Join(root, "lib/gnu/ld.so"), filepath.Join(root, "usr/lib64/ld.so")))

	tr := newTree(time.Unix(0, 0))
	files, err := tr.copyHostPath(filepath.Join(root, "lib64/ld.so"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 1 || files[0].imagePath != filepath.Join(root, "usr/lib/gnu/ld.so") {
		t.Fatalf("copied %+v, want the one regular file usr/lib/gnu/ld.so", files)
	}
	for p, want := range map[string]byte{
		"lib64":             tar.TypeSymlink,
		"usr/lib64/ld.so":   tar.TypeSymlink,
		"lib":               tar.TypeSymlink,
		"usr/lib/gnu/ld.so": tar.TypeReg,
		"usr/lib/gnu":       tar.TypeDir,
		"usr/lib64":         tar.TypeDir,
	} {
		e, ok := tr.entries[filepath.Join(root, p)]
		if !ok || e.typ != want {
			t.Errorf("%s: entry %+v, want type %c", p, e, want)
		}
	}
	if e := tr.entries[filepath.Join(root, "lib64")]; e.target != "usr/lib64" {
		t.Errorf("lib64 -> %q, want usr/lib64 (the link as the host has it)", e.target)
	}
	if _, err := tr.copyHostPath(filepath.Join(root, "lib/none.so")); err == nil {
		t.Error("a missing library copied without error")
	}
}

func writeSpec(t *testing.T) string {
	t.Helper()
	s := spec{
		Repository: "hwkms", Binary: "/usr/bin/hwkms", Entrypoint: []string{"/usr/bin/hwkms"},
		Cmd: []string{"serve"}, User: "0:0", Env: []string{"PATH=/usr/bin"},
		Dirs: map[string]string{"/etc/hwkms": "0750", "/tmp": "1777"}, Symlinks: map[string]string{"/var/run": "../run"},
		Passwd: "root:x:0:0:root:/root:/usr/sbin/nologin\n", Group: "root:x:0:\n",
	}
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "image.json")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestImageRoundTrip builds an image around a dynamically linked host binary and reads
// it back as an OCI layout and as a docker archive: same image, the binary at the
// spec's path, the spec's config; an archive of another image fails verifyArchive.
func TestImageRoundTrip(t *testing.T) {
	if _, err := exec.LookPath("ldd"); err != nil {
		t.Skip("ldd not installed (libc-bin)")
	}
	bin, err := exec.LookPath("true")
	if err != nil {
		t.Fatal(err)
	}
	specFile := writeSpec(t)
	dir := t.TempDir()
	build := func(name, binary string) (string, string) {
		t.Helper()
		out, archive := filepath.Join(dir, name), filepath.Join(dir, name+".tar")
		if err := cmdImage([]string{"-spec", specFile, "-binary", binary, "-version", "v1-test", "-commit", "c0ffee",
			"-source-date-epoch", "1700000000", "-out-dir", out, "-out-tar", archive}); err != nil {
			t.Fatal(err)
		}
		return out, archive
	}
	out, archive := build("a", bin)

	p, err := layout.FromPath(out)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := p.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil || len(im.Manifests) != 1 {
		t.Fatalf("index: %v, %+v", err, im)
	}
	if got := im.Manifests[0].Annotations["io.containerd.image.name"]; got != "docker.io/library/hwkms:v1-test" {
		t.Errorf("containerd name %q", got)
	}
	fromLayout, err := p.Image(im.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	if err := verifyArchive(archive, fromLayout); err != nil {
		t.Fatalf("archive is not the layout's image: %v", err)
	}
	fromTar, err := tarball.ImageFromPath(archive, nil)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := fromTar.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cf.Config.Entrypoint, []string{"/usr/bin/hwkms"}) || cf.Config.User != "0:0" ||
		cf.Config.Labels["org.opencontainers.image.revision"] != "c0ffee" || cf.Created.Unix() != 1700000000 {
		t.Errorf("config %+v", cf.Config)
	}
	layers, err := fromTar.Layers()
	if err != nil || len(layers) != 2 {
		t.Fatalf("%d layers, %v", len(layers), err)
	}
	rc, err := layers[1].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	found := false
	for {
		h, err := tr.Next()
		if err != nil {
			break
		}
		if h.Name == "usr/bin/hwkms" && h.Mode == 0o755 && h.Uid == 0 {
			found = true
		}
	}
	if !found {
		t.Error("the binary layer has no usr/bin/hwkms 0755 root")
	}

	// The same inputs give the same image (times come from -source-date-epoch).
	out2, _ := build("b", bin)
	p2, _ := layout.FromPath(out2)
	idx2, _ := p2.ImageIndex()
	im2, _ := idx2.IndexManifest()
	if im2.Manifests[0].Digest != im.Manifests[0].Digest {
		t.Errorf("rebuild gave %s, first build %s", im2.Manifests[0].Digest, im.Manifests[0].Digest)
	}
	// Another binary: another image, which verifyArchive tells apart.
	other, err := exec.LookPath("false")
	if err != nil {
		t.Fatal(err)
	}
	_, archive3 := build("c", other)
	if err := verifyArchive(archive3, fromLayout); err == nil {
		t.Error("verifyArchive accepted the archive of another image")
	}
}

func TestWrapSBOM(t *testing.T) {
	dir := t.TempDir()
	in := filepath.Join(dir, "bin.cdx.json")
	bin := `{"bomFormat":"CycloneDX","specVersion":"1.6","version":1,
	  "metadata":{"component":{"bom-ref":"pkg:golang/x@v1","name":"x","type":"application"}},
	  "components":[{"bom-ref":"pkg:golang/dep@v2","name":"dep","type":"library"}],
	  "dependencies":[{"ref":"pkg:golang/x@v1","dependsOn":["pkg:golang/dep@v2"]}]}`
	if err := os.WriteFile(in, []byte(bin), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "art.cdx.json")
	top := map[string]any{"bom-ref": "pkg:deb/x@1?arch=amd64", "name": "x", "type": "application"}
	extra := []map[string]any{{"bom-ref": "pkg:deb/debian/libc6@2.36", "name": "libc6", "type": "library"}}
	if err := wrapSBOM(in, out, top, extra, time.Unix(0, 0)); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(data), `\u0026`) {
		t.Error("package URLs are HTML-escaped")
	}
	var bom struct {
		Metadata struct {
			Component map[string]any `json:"component"`
		} `json:"metadata"`
		Components   []map[string]any `json:"components"`
		Dependencies []struct {
			Ref       string   `json:"ref"`
			DependsOn []string `json:"dependsOn"`
		} `json:"dependencies"`
	}
	if err := json.Unmarshal(data, &bom); err != nil {
		t.Fatal(err)
	}
	if bom.Metadata.Component["bom-ref"] != top["bom-ref"] {
		t.Errorf("described component %v", bom.Metadata.Component)
	}
	var refs []string
	for _, c := range bom.Components {
		refs = append(refs, c["bom-ref"].(string))
	}
	if !slices.Equal(refs, []string{"pkg:golang/x@v1", "pkg:golang/dep@v2", "pkg:deb/debian/libc6@2.36"}) {
		t.Errorf("components %q", refs)
	}
	if len(bom.Dependencies) != 2 || bom.Dependencies[0].Ref != top["bom-ref"] ||
		!slices.Equal(bom.Dependencies[0].DependsOn, []string{"pkg:golang/x@v1", "pkg:deb/debian/libc6@2.36"}) {
		t.Errorf("dependencies %+v", bom.Dependencies)
	}
	if err := os.WriteFile(in, []byte(`{"bomFormat":"SPDX"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := wrapSBOM(in, out, top, nil, time.Unix(0, 0)); err == nil {
		t.Error("wrapSBOM accepted a non-CycloneDX input")
	}
}
