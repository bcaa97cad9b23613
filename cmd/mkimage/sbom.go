package main

import (
	"bytes"
	"crypto/rand"
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
	"sort"
	"strings"
	"time"
)

// cmdSBOM writes the SBOM of one artifact (a .deb or .rpm) that packages the binary:
// the binary's SBOM (cyclonedx-gomod) with the artifact as the described component,
// its SHA-256, and the binary as what it contains.
func cmdSBOM(args []string) error {
	fs := flag.NewFlagSet("mkimage sbom", flag.ContinueOnError)
	in := fs.String("in", "", "the binary's CycloneDX SBOM (cyclonedx-gomod)")
	out := fs.String("out", "", "write the artifact's SBOM here")
	artifact := fs.String("artifact", "", "the artifact file (hashed into the SBOM)")
	name := fs.String("name", "hwkms", "package name")
	version := fs.String("version", "", "package version")
	purl := fs.String("purl", "", "the artifact's package URL, e.g. pkg:deb/hwkms@1.0?arch=amd64")
	epoch := fs.Int64("source-date-epoch", 0, "SBOM timestamp (seconds since 1970)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *in == "" || *out == "" || *artifact == "" || *purl == "" || *version == "" {
		return errors.New("-in, -out, -artifact, -version and -purl are required")
	}
	data, err := os.ReadFile(*artifact)
	if err != nil {
		return err
	}
	sum := sha256.Sum256(data)
	top := map[string]any{
		"type":    "application",
		"bom-ref": *purl,
		"name":    *name,
		"version": *version,
		"purl":    *purl,
		"hashes":  []any{map[string]any{"alg": "SHA-256", "content": hex.EncodeToString(sum[:])}},
		"properties": []any{
			map[string]any{"name": "hwkms:artifact", "value": path.Base(*artifact)},
		},
	}
	return wrapSBOM(*in, *out, top, nil, time.Unix(*epoch, 0).UTC())
}

// runtimeComponents describes the C runtime files copied into the image: one file
// component each (path, SHA-256) and, where dpkg knows the file, the Debian package
// it came from with its version (libc6 on Debian 12).
func runtimeComponents(files []hostFile) ([]map[string]any, error) {
	var out []map[string]any
	pkgs := map[string][]string{} // package component bom-ref -> file bom-refs
	pkgComp := map[string]map[string]any{}
	for _, f := range files {
		ref := "file:" + f.imagePath
		c := map[string]any{
			"type": "file", "bom-ref": ref, "name": f.imagePath,
			"hashes": []any{map[string]any{"alg": "SHA-256", "content": f.sha256}},
		}
		out = append(out, c)
		pkg, ver, arch, err := debPackage(f.hostPath, f.imagePath)
		if err != nil {
			return nil, err
		}
		if pkg == "" {
			continue
		}
		purl := fmt.Sprintf("pkg:deb/debian/%s@%s?arch=%s&distro=debian-%s", pkg, ver, arch, debianVersion())
		if _, ok := pkgComp[purl]; !ok {
			pkgComp[purl] = map[string]any{"type": "library", "bom-ref": purl, "name": pkg, "version": ver, "purl": purl}
		}
		pkgs[purl] = append(pkgs[purl], ref)
	}
	refs := make([]string, 0, len(pkgComp))
	for r := range pkgComp {
		refs = append(refs, r)
	}
	sort.Strings(refs)
	for _, r := range refs {
		c := pkgComp[r]
		c["properties"] = []any{map[string]any{"name": "hwkms:files", "value": strings.Join(pkgs[r], " ")}}
		out = append(out, c)
	}
	return out, nil
}

// debPackage asks dpkg which package installed the file (under the path ldd named or
// its resolved path: merged-/usr Debian records /lib/...). No dpkg, or no owner: "".
func debPackage(paths ...string) (pkg, version, arch string, err error) {
	if _, err := exec.LookPath("dpkg-query"); err != nil {
		return "", "", "", nil
	}
	for _, p := range paths {
		for _, q := range []string{p, strings.TrimPrefix(p, "/usr")} {
			out, err := exec.Command("dpkg-query", "-S", q).Output()
			if err != nil {
				continue
			}
			name, _, ok := strings.Cut(strings.TrimSpace(string(out)), ": ")
			if !ok {
				continue
			}
			name, _, _ = strings.Cut(name, ",")
			v, err := exec.Command("dpkg-query", "-W", "-f", "${Version} ${Architecture}", name).Output()
			if err != nil {
				return "", "", "", fmt.Errorf("dpkg-query -W %s: %w", name, err)
			}
			f := strings.Fields(string(v))
			if len(f) != 2 {
				return "", "", "", fmt.Errorf("dpkg-query -W %s: %q", name, v)
			}
			base, _, _ := strings.Cut(name, ":") // libc6:amd64
			return base, f[0], f[1], nil
		}
	}
	return "", "", "", nil
}

func debianVersion() string {
	data, err := os.ReadFile("/etc/debian_version")
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(data))
}

// wrapSBOM writes a CycloneDX BOM describing top: it contains the binary (the input
// BOM's metadata.component, with all of its components and dependencies) and extra.
func wrapSBOM(in, out string, top map[string]any, extra []map[string]any, created time.Time) error {
	data, err := os.ReadFile(in)
	if err != nil {
		return err
	}
	var bom map[string]any
	if err := json.Unmarshal(data, &bom); err != nil {
		return fmt.Errorf("%s: %w", in, err)
	}
	if bom["bomFormat"] != "CycloneDX" {
		return fmt.Errorf("%s: not a CycloneDX JSON BOM", in)
	}
	meta, _ := bom["metadata"].(map[string]any)
	bin, _ := meta["component"].(map[string]any)
	binRef, _ := bin["bom-ref"].(string)
	if binRef == "" {
		return fmt.Errorf("%s: metadata.component has no bom-ref", in)
	}
	comps, _ := bom["components"].([]any)
	comps = append([]any{bin}, comps...)
	depends := []any{binRef}
	for _, c := range extra {
		comps = append(comps, c)
		depends = append(depends, c["bom-ref"])
	}
	bom["components"] = comps
	deps, _ := bom["dependencies"].([]any)
	bom["dependencies"] = append([]any{map[string]any{"ref": top["bom-ref"], "dependsOn": depends}}, deps...)
	meta["component"] = top
	meta["timestamp"] = created.Format(time.RFC3339)
	bom["metadata"] = meta
	serial, err := uuid()
	if err != nil {
		return err
	}
	bom["serialNumber"] = "urn:uuid:" + serial
	bom["version"] = 1
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // package URLs keep their & as cyclonedx-gomod writes them
	enc.SetIndent("", "  ")
	if err := enc.Encode(bom); err != nil {
		return err
	}
	return os.WriteFile(out, buf.Bytes(), 0o644)
}

func uuid() (string, error) {
	var b [16]byte
	if _, err := io.ReadFull(rand.Reader, b[:]); err != nil {
		return "", err
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:], nil
}
