package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// spec is deploy/packaging/image.json: what the image holds besides the C runtime.
type spec struct {
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

func readSpec(file string) (*spec, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var s spec
	if err := dec.Decode(&s); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	if !path.IsAbs(s.Binary) || len(s.Entrypoint) == 0 || s.Repository == "" {
		return nil, fmt.Errorf("%s: binary must be absolute, entrypoint and repository set", file)
	}
	return &s, nil
}

func cmdImage(args []string) error {
	fs := flag.NewFlagSet("mkimage image", flag.ContinueOnError)
	specFile := fs.String("spec", "deploy/packaging/image.json", "image spec")
	binary := fs.String("binary", "bin/hwkms", "the hwkms binary to put at spec.binary")
	version := fs.String("version", "", "image tag (the hwkms version)")
	commit := fs.String("commit", "", "source commit (label org.opencontainers.image.revision)")
	epoch := fs.Int64("source-date-epoch", 0, "timestamp of the image and every file (seconds since 1970)")
	outDir := fs.String("out-dir", "", "write the OCI image layout to this directory (replaced)")
	outTar := fs.String("out-tar", "", "write the docker/OCI archive to this file")
	sbomIn := fs.String("sbom-in", "", "the binary's CycloneDX SBOM (cyclonedx-gomod)")
	sbomOut := fs.String("sbom-out", "", "write the image's CycloneDX SBOM here")
	ldd := fs.String("ldd", "ldd", "ldd program")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *version == "" || *outDir == "" || *outTar == "" {
		return errors.New("-version, -out-dir and -out-tar are required")
	}
	s, err := readSpec(*specFile)
	if err != nil {
		return err
	}
	created := time.Unix(*epoch, 0).UTC()

	libs, err := sharedLibraries(*ldd, *binary)
	if err != nil {
		return err
	}
	rt := newTree(created)
	for d, m := range s.Dirs {
		mode, err := strconv.ParseUint(m, 8, 32)
		if err != nil {
			return fmt.Errorf("spec dirs[%s]: mode %q: %w", d, m, err)
		}
		rt.dir(d, int64(mode))
	}
	for l, target := range s.Symlinks {
		rt.symlink(l, target)
	}
	rt.file("/etc/passwd", []byte(s.Passwd), 0o644)
	rt.file("/etc/group", []byte(s.Group), 0o644)
	var copied []hostFile
	for _, l := range libs {
		files, err := rt.copyHostPath(l)
		if err != nil {
			return err
		}
		copied = append(copied, files...)
	}
	bin, err := os.ReadFile(*binary)
	if err != nil {
		return err
	}
	bt := newTree(created)
	bt.file(s.Binary, bin, 0o755)

	img, err := buildImage(s, *version, *commit, created, []*tree{rt, bt}, []string{
		"C runtime from the build host: " + strings.Join(libs, " ") + "; /etc/passwd, /etc/group",
		"hwkms " + *version + " at " + s.Binary,
	})
	if err != nil {
		return err
	}
	ref := "docker.io/library/" + s.Repository + ":" + *version
	if strings.Contains(s.Repository, "/") {
		ref = s.Repository + ":" + *version
	}
	digest, err := writeLayout(*outDir, img, ref, *version)
	if err != nil {
		return err
	}
	if err := writeArchive(*outTar, *outDir, img, s.Repository+":"+*version); err != nil {
		return err
	}
	if err := verifyArchive(*outTar, img); err != nil {
		return err
	}
	fmt.Printf("image %s:%s %s\n  layout %s\n  archive %s\n", s.Repository, *version, digest, *outDir, *outTar)
	if *sbomOut != "" {
		if *sbomIn == "" {
			return errors.New("-sbom-out needs -sbom-in")
		}
		top := map[string]any{
			"type":    "container",
			"name":    s.Repository,
			"version": *version,
			"purl":    "pkg:oci/" + path.Base(s.Repository) + "@" + strings.Replace(digest.String(), ":", "%3A", 1) + "?tag=" + *version,
		}
		top["bom-ref"] = top["purl"]
		extra, err := runtimeComponents(copied)
		if err != nil {
			return err
		}
		if err := wrapSBOM(*sbomIn, *sbomOut, top, extra, created); err != nil {
			return err
		}
	}
	return nil
}

// sharedLibraries returns the paths `ldd binary` names: each resolved library and the
// dynamic loader (not the vDSO, which the kernel provides).
func sharedLibraries(ldd, binary string) ([]string, error) {
	out, err := exec.Command(ldd, binary).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("%s %s: %v: %s (hwkms needs cgo: build with CGO_ENABLED=1)", ldd, binary, err, bytes.TrimSpace(out))
	}
	var libs []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 3 && f[1] == "=>" && f[2] == "not":
			return nil, fmt.Errorf("ldd %s: %s not found", binary, f[0])
		case len(f) >= 3 && f[1] == "=>" && path.IsAbs(f[2]):
			libs = append(libs, f[2])
		case len(f) >= 1 && path.IsAbs(f[0]):
			libs = append(libs, f[0]) // the dynamic loader
		}
	}
	if len(libs) == 0 {
		return nil, fmt.Errorf("ldd %s named no libraries: %s", binary, out)
	}
	return libs, nil
}

// entry is one file, directory or symbolic link of a layer.
type entry struct {
	typ    byte
	mode   int64
	data   []byte
	target string
}

// tree is the content of one layer, by absolute path.
type tree struct {
	created time.Time
	entries map[string]*entry
}

// hostFile is a regular file copied from the build host: the path ldd named (or a
// path on the way), where it ended up in the image, and its SHA-256.
type hostFile struct {
	hostPath, imagePath, sha256 string
}

func newTree(created time.Time) *tree { return &tree{created: created, entries: map[string]*entry{}} }

// parents adds the missing parent directories of p (mode 0755).
func (t *tree) parents(p string) {
	for d := path.Dir(p); d != "/"; d = path.Dir(d) {
		if _, ok := t.entries[d]; !ok {
			t.entries[d] = &entry{typ: tar.TypeDir, mode: 0o755}
		}
	}
}

func (t *tree) dir(p string, mode int64) {
	p = path.Clean(p)
	t.parents(p)
	t.entries[p] = &entry{typ: tar.TypeDir, mode: mode}
}

func (t *tree) file(p string, data []byte, mode int64) {
	p = path.Clean(p)
	t.parents(p)
	t.entries[p] = &entry{typ: tar.TypeReg, mode: mode, data: data}
}

func (t *tree) symlink(p, target string) {
	p = path.Clean(p)
	t.parents(p)
	t.entries[p] = &entry{typ: tar.TypeSymlink, mode: 0o777, target: target}
}

// copyHostPath copies the host file at p into the tree at the same path. Every
// symbolic link met on the way (a directory such as /lib64 -> usr/lib64, or the file
// itself) becomes the same link in the tree, and resolution continues at its target,
// so the path works in the image exactly as on the host.
func (t *tree) copyHostPath(p string) ([]hostFile, error) {
	var out []hostFile
	orig := p
	for hops := 0; ; hops++ {
		if hops > 40 {
			return nil, fmt.Errorf("%s: too many symbolic links", orig)
		}
		next, done, err := t.copyStep(path.Clean(p), orig, &out)
		if err != nil {
			return nil, err
		}
		if done {
			return out, nil
		}
		p = next
	}
}

// copyStep walks p from the root; at the first symbolic link it records the link and
// returns the path to continue with; at a regular file it copies it (done).
func (t *tree) copyStep(p, orig string, out *[]hostFile) (next string, done bool, err error) {
	parts := strings.Split(strings.TrimPrefix(p, "/"), "/")
	cur := "/"
	for i, part := range parts {
		cur = path.Join(cur, part)
		fi, err := os.Lstat(cur)
		if err != nil {
			return "", false, err
		}
		switch {
		case fi.Mode()&os.ModeSymlink != 0:
			target, err := os.Readlink(cur)
			if err != nil {
				return "", false, err
			}
			t.symlink(cur, target)
			resolved := target
			if !path.IsAbs(target) {
				resolved = path.Join(path.Dir(cur), target)
			}
			return path.Join(append([]string{resolved}, parts[i+1:]...)...), false, nil
		case i < len(parts)-1:
			if !fi.IsDir() {
				return "", false, fmt.Errorf("%s: %s is not a directory", orig, cur)
			}
			if _, ok := t.entries[cur]; !ok {
				t.entries[cur] = &entry{typ: tar.TypeDir, mode: int64(fi.Mode().Perm())}
			}
		case fi.Mode().IsRegular():
			data, err := os.ReadFile(cur)
			if err != nil {
				return "", false, err
			}
			t.file(cur, data, int64(fi.Mode().Perm()))
			sum := sha256.Sum256(data)
			*out = append(*out, hostFile{hostPath: orig, imagePath: cur, sha256: hex.EncodeToString(sum[:])})
			return "", true, nil
		default:
			return "", false, fmt.Errorf("%s: %s is neither a file nor a link", orig, cur)
		}
	}
	return "", false, fmt.Errorf("%s: empty path", orig)
}

// tarball returns the tree as an uncompressed tar: sorted (parents first), owned by
// root, every time the image's creation time, so equal inputs give equal layers.
func (t *tree) tarball() ([]byte, error) {
	names := make([]string, 0, len(t.entries))
	for p := range t.entries {
		names = append(names, p)
	}
	sort.Strings(names)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, p := range names {
		e := t.entries[p]
		h := &tar.Header{
			Typeflag: e.typ, Name: strings.TrimPrefix(p, "/"), Mode: e.mode, Linkname: e.target,
			ModTime: t.created, Uname: "root", Gname: "root", Format: tar.FormatPAX,
		}
		if e.typ == tar.TypeDir {
			h.Name += "/"
		}
		if e.typ == tar.TypeReg {
			h.Size = int64(len(e.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// buildImage makes the OCI image of the layers (bottom first), with the config the
// spec gives and OCI media types throughout.
func buildImage(s *spec, version, commit string, created time.Time, layers []*tree, history []string) (v1.Image, error) {
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	for i, t := range layers {
		data, err := t.tarball()
		if err != nil {
			return nil, err
		}
		l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(data)), nil
		}, tarball.WithMediaType(types.OCILayer))
		if err != nil {
			return nil, err
		}
		img, err = mutate.Append(img, mutate.Addendum{
			Layer: l, MediaType: types.OCILayer,
			History: v1.History{Created: v1.Time{Time: created}, CreatedBy: "cmd/mkimage: " + history[i], Comment: "hwkms make image"},
		})
		if err != nil {
			return nil, err
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS = runtime.GOARCH, "linux"
	cf.Created = v1.Time{Time: created}
	cf.Config.Entrypoint = s.Entrypoint
	cf.Config.Cmd = s.Cmd
	cf.Config.User = s.User
	cf.Config.Env = s.Env
	cf.Config.WorkingDir = "/"
	cf.Config.Labels = map[string]string{
		"org.opencontainers.image.title":       s.Repository,
		"org.opencontainers.image.description": "hwkms Kubernetes KMS v2 plugin (KEK in an HSM or TPM)",
		"org.opencontainers.image.version":     version,
		"org.opencontainers.image.revision":    commit,
		"org.opencontainers.image.created":     created.Format(time.RFC3339),
	}
	return mutate.ConfigFile(img, cf)
}

// writeLayout replaces dir with an OCI image layout holding img, named ref (the
// containerd and podman name annotation) and tag (org.opencontainers.image.ref.name).
func writeLayout(dir string, img v1.Image, ref, tag string) (v1.Hash, error) {
	if err := os.RemoveAll(dir); err != nil {
		return v1.Hash{}, err
	}
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return v1.Hash{}, err
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{
		"io.containerd.image.name":          ref,
		"org.opencontainers.image.ref.name": tag,
	})); err != nil {
		return v1.Hash{}, err
	}
	return img.Digest()
}

// dockerManifest is one entry of a docker archive's manifest.json.
type dockerManifest struct {
	Config   string   `json:"Config"`
	RepoTags []string `json:"RepoTags"`
	Layers   []string `json:"Layers"`
}

// writeArchive tars the OCI layout in dir and adds the docker archive's manifest.json,
// whose paths are the layout's blobs: one file both formats read.
func writeArchive(file, dir string, img v1.Image, repoTag string) error {
	cfgName, err := img.ConfigName()
	if err != nil {
		return err
	}
	m := dockerManifest{Config: blobPath(cfgName), RepoTags: []string{repoTag}}
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	for _, l := range layers {
		d, err := l.Digest()
		if err != nil {
			return err
		}
		m.Layers = append(m.Layers, blobPath(d))
	}
	manifest, err := json.Marshal([]dockerManifest{m})
	if err != nil {
		return err
	}
	var names []string
	err = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if rel, _ := filepath.Rel(dir, p); rel != "." {
			names = append(names, rel)
		}
		return nil
	})
	if err != nil {
		return err
	}
	sort.Strings(names)
	tmp := file + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	defer f.Close()
	tw := tar.NewWriter(f)
	for _, n := range names {
		fi, err := os.Stat(filepath.Join(dir, n))
		if err != nil {
			return err
		}
		h := &tar.Header{Name: filepath.ToSlash(n), Mode: 0o644, ModTime: time.Unix(0, 0), Format: tar.FormatPAX}
		if fi.IsDir() {
			h.Typeflag, h.Name, h.Mode = tar.TypeDir, h.Name+"/", 0o755
			if err := tw.WriteHeader(h); err != nil {
				return err
			}
			continue
		}
		h.Typeflag, h.Size = tar.TypeReg, fi.Size()
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		src, err := os.Open(filepath.Join(dir, n))
		if err != nil {
			return err
		}
		_, err = io.Copy(tw, src)
		src.Close()
		if err != nil {
			return err
		}
	}
	h := &tar.Header{Name: "manifest.json", Mode: 0o644, Size: int64(len(manifest)), ModTime: time.Unix(0, 0), Format: tar.FormatPAX}
	if err := tw.WriteHeader(h); err != nil {
		return err
	}
	if _, err := tw.Write(manifest); err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, file)
}

func blobPath(h v1.Hash) string { return "blobs/" + h.Algorithm + "/" + h.Hex }

// verifyArchive reads the archive back as a docker archive (manifest.json) and checks
// that it holds the layout's image: the same config and layers, every digest verified.
func verifyArchive(file string, want v1.Image) error {
	img, err := tarball.ImageFromPath(file, nil)
	if err != nil {
		return fmt.Errorf("%s as a docker archive: %w", file, err)
	}
	cfg, err := img.RawConfigFile()
	if err != nil {
		return err
	}
	wantCfg, err := want.ConfigName()
	if err != nil {
		return err
	}
	if sum := sha256.Sum256(cfg); hex.EncodeToString(sum[:]) != wantCfg.Hex {
		return fmt.Errorf("%s: config is not the layout's %s", file, wantCfg)
	}
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	wantLayers, err := want.Layers()
	if err != nil {
		return err
	}
	if len(layers) != len(wantLayers) {
		return fmt.Errorf("%s: %d layers, the layout has %d", file, len(layers), len(wantLayers))
	}
	for i, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			return err
		}
		h := sha256.New()
		_, err = io.Copy(h, rc)
		rc.Close()
		if err != nil {
			return fmt.Errorf("%s: layer %d: %w", file, i, err)
		}
		wd, err := wantLayers[i].Digest()
		if err != nil {
			return err
		}
		if got := hex.EncodeToString(h.Sum(nil)); got != wd.Hex {
			return fmt.Errorf("%s: layer %d is sha256:%s, the layout's is %s", file, i, got, wd)
		}
	}
	return nil
}
