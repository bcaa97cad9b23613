package main

// TPM import (docs/ha.md): tpm export-srk, tpm provision (and key create --import-for),
// tpm escrow-keygen, tpm recover and key import. Several nodes share one KEK made in
// memory in a ceremony and imported into each node's TPM under its SRK.

import (
	"context"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/hwkms/hwkms/plugin/config"
	"github.com/hwkms/hwkms/plugin/files"
	"github.com/hwkms/hwkms/tpm"
	"github.com/hwkms/hwkms/tpm/provision"
)

func cmdExportSRK(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("tpm export-srk", stderr)
	device := fs.String("device", tpm.DefaultDevice, "TPM device: /dev/tpmrm0, tcp://host:port or unix:///path")
	out := fs.String("out", "", "write the SRK public area (TPM2B_PUBLIC) to this file instead of stdout (PEM)")
	withEK := fs.Bool("ek", false, "also export the endorsement key and its manufacturer certificate (from TPM NV), so the ceremony can check with --ek-roots that the SRK is in a genuine TPM; the file is then PEM")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	srk, err := tpm.ExportSRK(ctx, *device)
	if err != nil {
		return fmt.Errorf("tpm export-srk: %w", err)
	}
	fmt.Fprintf(stdout, "srk_name: %s\n", hex.EncodeToString(srk.Name))
	data := srk.Public
	if *withEK {
		ek, err := tpm.ExportEK(ctx, *device)
		if err != nil {
			return fmt.Errorf("tpm export-srk: %w", err)
		}
		fmt.Fprintf(stdout, "ek_name: %s\n", hex.EncodeToString(ek.Name))
		data = append(srk.EncodeSRKPEM(), ek.EncodePEM()...)
	}
	if *out == "" {
		if !*withEK {
			data = srk.EncodeSRKPEM()
		}
		_, err := stdout.Write(data)
		return err
	}
	if err := writeExcl(*out, data, 0o644); err != nil {
		return fmt.Errorf("tpm export-srk: %w", err)
	}
	fmt.Fprintf(stdout, "wrote %s\n", *out)
	return nil
}

// importTargets reads the comma-separated SRK public files and maps each to
// DIR/<basename without extension>.import. With trust (from --ek-roots) every file
// must carry an EK whose certificate chains to it; the results are in eks.
func importTargets(list, dir string, trust *provision.EKTrust) (pubs [][]byte, outs []string, eks []*provision.NodeEK, err error) {
	if list == "" {
		return nil, nil, nil, errors.New("--import-for is required")
	}
	if dir == "" {
		return nil, nil, nil, errors.New("--out-dir is required")
	}
	seen := map[string]bool{}
	for _, p := range strings.Split(list, ",") {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, nil, nil, err
		}
		if _, _, err := provision.ParseSRKPublic(b); err != nil {
			return nil, nil, nil, fmt.Errorf("%s: %w", p, err)
		}
		if trust != nil {
			ek, err := provision.VerifyNodeEK(b, trust)
			if err != nil {
				return nil, nil, nil, fmt.Errorf("%s: %w", p, err)
			}
			eks = append(eks, ek)
		}
		base := strings.TrimSuffix(filepath.Base(p), filepath.Ext(p))
		if seen[base] || base == "escrow" {
			return nil, nil, nil, fmt.Errorf("%s: output name %q.import is used twice (or is reserved)", p, base)
		}
		seen[base] = true
		pubs = append(pubs, b)
		outs = append(outs, filepath.Join(dir, base+".import"))
	}
	return pubs, outs, eks, nil
}

// ekTrust reads --ek-roots; "" means no EK verification.
func ekTrust(path string) (*provision.EKTrust, error) {
	if path == "" {
		return nil, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return provision.ParseEKTrust(b)
}

const ekRootsUsage = "PEM file of the TPM manufacturers' EK CA certificates (roots and issuing CAs): every --import-for file must then carry an EK (export-srk --ek) whose certificate chains to them, and each blob is bound to that EK (only that TPM can import it)"

// provisionFlags are the flags of tpm provision, which key create also takes.
type provisionFlags struct {
	importFor, outDir, escrowPub, authFile, ekRoots *string
}

// addProvisionFlags defines the provisioning flags on fs.
func addProvisionFlags(fs *flag.FlagSet) provisionFlags {
	return provisionFlags{
		importFor: fs.String("import-for", "", "comma-separated SRK public files (from hwkms tpm export-srk), one per node"),
		outDir:    fs.String("out-dir", "", "directory for the import blobs (created if missing)"),
		escrowPub: fs.String("escrow-pub", "", "optional escrow public key (hwkms tpm escrow-keygen): also write DIR/escrow.import"),
		authFile:  fs.String("auth-file", "", "optional file with the KEK auth value (16-32 bytes); nodes then need tpm.authFile with it"),
		ekRoots:   fs.String("ek-roots", "", ekRootsUsage),
	}
}

func cmdProvision(args []string, stdout, stderr io.Writer, name string) error {
	fs := newFlags(name, stderr)
	f := addProvisionFlags(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	return provisionKEK(f, stdout, name)
}

// provisionKEK generates a KEK in memory and writes its import blobs (tpm provision, key
// create --import-for). name prefixes errors.
func provisionKEK(f provisionFlags, stdout io.Writer, name string) error {
	trust, err := ekTrust(*f.ekRoots)
	if err != nil {
		return fmt.Errorf("%s: --ek-roots: %w", name, err)
	}
	pubs, outs, eks, err := importTargets(*f.importFor, *f.outDir, trust)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	var auth []byte
	if *f.authFile != "" {
		if auth, err = readAuthFile(*f.authFile); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		defer clear(auth)
	}
	m, err := provision.NewKEKMaterial(auth)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	defer m.Destroy()
	return writeBlobs(m, pubs, outs, eks, *f.outDir, *f.escrowPub, stdout, name)
}

// writeBlobs writes one import blob per SRK (and the escrow blob) into dir. With
// eks (one per SRK, verified), each node's blob is bound to its EK.
func writeBlobs(m *provision.KEKMaterial, pubs [][]byte, outs []string, eks []*provision.NodeEK, dir, escrowPub string, stdout io.Writer, name string) error {
	blobs := make([][]byte, 0, len(pubs)+1)
	for i, pub := range pubs {
		var blob []byte
		var err error
		if eks != nil {
			blob, err = m.ImportBlobForEK(pub, eks[i])
		} else {
			blob, err = m.ImportBlob(pub)
		}
		if err != nil {
			return fmt.Errorf("%s: %s: %w", name, outs[i], err)
		}
		blobs = append(blobs, blob)
	}
	if escrowPub != "" {
		b, err := os.ReadFile(escrowPub)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		blob, err := m.ImportBlob(b)
		if err != nil {
			return fmt.Errorf("%s: escrow: %w", name, err)
		}
		blobs = append(blobs, blob)
		outs = append(outs, filepath.Join(dir, "escrow.import"))
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	// All or nothing: a ceremony that stops half way must not leave node blobs without
	// their escrow copy (the KEK material is gone when it returns).
	for _, out := range outs {
		if _, err := os.Lstat(out); err == nil {
			return fmt.Errorf("%s: %s already exists; nothing written", name, out)
		}
	}
	var written []string
	for i, blob := range blobs {
		if err := writeExcl(outs[i], blob, 0o600); err != nil {
			for _, w := range written {
				os.Remove(w)
			}
			return fmt.Errorf("%s: %w (the blobs of this run were removed)", name, err)
		}
		written = append(written, outs[i])
	}
	fmt.Fprintf(stdout, "key_id: %s\n", m.KeyID())
	for i, blob := range blobs {
		info, _ := provision.InspectImportBlob(blob)
		fmt.Fprintf(stdout, "wrote %s for SRK %s", outs[i], hex.EncodeToString(info.ParentName))
		if info.EKName != nil {
			fmt.Fprintf(stdout, ", bound to EK %s (certificate serial %s, issuer %q)", hex.EncodeToString(info.EKName), eks[i].Serial, eks[i].Issuer)
		}
		fmt.Fprintln(stdout)
	}
	return nil
}

func cmdEscrowKeygen(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("tpm escrow-keygen", stderr)
	outKey := fs.String("out-key", "", "file for the escrow private key (keep it offline)")
	outPub := fs.String("out-pub", "", "file for the escrow public key (pass to --escrow-pub)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *outKey == "" || *outPub == "" {
		return errors.New("tpm escrow-keygen: --out-key and --out-pub are required")
	}
	priv, pub, err := provision.NewEscrowKey()
	if err != nil {
		return err
	}
	defer clear(priv)
	if err := writeExcl(*outKey, priv, 0o600); err != nil {
		return fmt.Errorf("tpm escrow-keygen: %w", err)
	}
	if err := writeExcl(*outPub, pub.EncodeSRKPEM(), 0o644); err != nil {
		return fmt.Errorf("tpm escrow-keygen: %w", err)
	}
	fmt.Fprintf(stdout, "escrow_name: %s\nwrote %s (private: move it offline) and %s\n", hex.EncodeToString(pub.Name), *outKey, *outPub)
	return nil
}

func cmdRecover(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("tpm recover", stderr)
	escrowBlob := fs.String("escrow-blob", "", "escrow.import written at provisioning")
	escrowKey := fs.String("escrow-key", "", "the offline escrow private key")
	importFor := fs.String("import-for", "", "comma-separated SRK public files of the new nodes")
	outDir := fs.String("out-dir", "", "directory for the new import blobs")
	escrowPub := fs.String("escrow-pub", "", "optional: also write a fresh DIR/escrow.import for this escrow public key")
	ekRoots := fs.String("ek-roots", "", ekRootsUsage)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *escrowBlob == "" || *escrowKey == "" {
		return errors.New("tpm recover: --escrow-blob and --escrow-key are required")
	}
	trust, err := ekTrust(*ekRoots)
	if err != nil {
		return fmt.Errorf("tpm recover: --ek-roots: %w", err)
	}
	pubs, outs, eks, err := importTargets(*importFor, *outDir, trust)
	if err != nil {
		return fmt.Errorf("tpm recover: %w", err)
	}
	blob, err := os.ReadFile(*escrowBlob)
	if err != nil {
		return fmt.Errorf("tpm recover: %w", err)
	}
	key, err := files.ReadSecret(*escrowKey, files.SecretOptions{})
	if err != nil {
		return fmt.Errorf("tpm recover: %w", err)
	}
	defer clear(key)
	m, err := provision.RecoverKEKMaterial(blob, key)
	if err != nil {
		return fmt.Errorf("tpm recover: %w", err)
	}
	defer m.Destroy()
	return writeBlobs(m, pubs, outs, eks, *outDir, *escrowPub, stdout, "tpm recover")
}

func cmdKeyImport(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("key import", stderr)
	device := fs.String("device", tpm.DefaultDevice, "TPM device: /dev/tpmrm0, tcp://host:port or unix:///path")
	blobPath := fs.String("blob", "", "this node's import blob (from tpm provision)")
	blobFile := fs.String("blob-file", "", "write the imported KEK to this blob file (tpm.blobFile)")
	handle := fs.String("handle", "", "or make it persistent at this handle (tpm.persistentHandle)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *blobPath == "" {
		return errors.New("key import: --blob is required")
	}
	blob, err := os.ReadFile(*blobPath)
	if err != nil {
		return fmt.Errorf("key import: %w", err)
	}
	cfg := tpm.Config{Device: *device, BlobFile: *blobFile, PersistentHandle: *handle}
	info, err := tpm.ImportKey(ctx, cfg, blob)
	if err != nil {
		return fmt.Errorf("key import: %w", err)
	}
	fmt.Fprintf(stdout, "imported into TPM %s: %s\nkey_id: %s\n", *device, config.TPMLocation(info), info.KeyID)
	if bi, err := provision.InspectImportBlob(blob); err == nil && bi.EKName != nil {
		fmt.Fprintf(stdout, "the blob was bound to this TPM's EK %s and activated with it\n", hex.EncodeToString(bi.EKName))
	}
	return nil
}

// readAuthFile reads a KEK auth value with the rules of tpm.Config.AuthFile: a secret
// file (files.ReadSecret), one trailing newline removed.
func readAuthFile(path string) ([]byte, error) {
	return files.ReadSecret(path, files.SecretOptions{})
}

// writeExcl writes a new file durably (files.WriteFile); it never overwrites.
func writeExcl(path string, data []byte, mode os.FileMode) error {
	return files.WriteFile(path, data, files.WriteOptions{Mode: mode, Exclusive: true})
}
