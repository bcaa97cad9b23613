package main

// Commands for several control-plane nodes sharing one KEK (docs/ha.md):
// TPM import (export-srk, provision, escrow, recover, key import), PKCS#11
// replication (key create --replicable, key replicate) and cluster-check.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	kmsapi "k8s.io/kms/apis/v2"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/tpm"
	"github.com/hwkms/hwkms/tpm/provision"
)

const haUsage = `HA commands (docs/ha.md):
  hwkms tpm export-srk --device D [--out FILE]
        print this TPM's owner SRK Name and write its public area (TPM2B_PUBLIC, PEM without --out)
  hwkms tpm provision --import-for a.pub,b.pub,... --out-dir DIR [--escrow-pub escrow.pub] [--auth-file F]
  hwkms key create --backend tpm --import-for a.pub,... --out-dir DIR [...]   (same as tpm provision)
        generate one KEK in memory (no TPM needed) and write DIR/<name>.import per SRK (+ DIR/escrow.import)
  hwkms tpm escrow-keygen --out-key escrow.key --out-pub escrow.pub
        make the offline escrow key pair
  hwkms tpm recover --escrow-blob escrow.import --escrow-key escrow.key --import-for a.pub,... --out-dir DIR [--escrow-pub P]
        rebuild the KEK from the escrow and write import blobs for new TPMs
  hwkms key import --device D --blob node.import (--blob-file PATH | --handle 0x81010010)
        TPM2_Import the blob under this TPM's SRK; the result is an ordinary hwkms KEK for tpm.blobFile/persistentHandle
  hwkms key create --config FILE [--key N] --replicable [--wrap-with-trusted]
        PKCS#11: create keys[N] as a replicable KEK (sensitive, extractable only by wrapping)
  hwkms key replicate --config FILE [--key N] --to-config FILE [--to-key M]
        PKCS#11: copy keys[N]'s key to the token of the other config's keys[M] (C_WrapKey/C_UnwrapKey)
  hwkms cluster-check --sockets a,b,c [--timeout D]
        same key_id and healthy everywhere, and every node decrypts every other node's Encrypt
`

func cmdTPM(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, haUsage)
		return exitError(2)
	}
	switch args[0] {
	case "export-srk":
		return cmdExportSRK(ctx, args[1:], stdout, stderr)
	case "provision":
		return cmdProvision(args[1:], stdout, stderr, "tpm provision")
	case "escrow-keygen":
		return cmdEscrowKeygen(args[1:], stdout, stderr)
	case "recover":
		return cmdRecover(args[1:], stdout, stderr)
	}
	fmt.Fprintf(stderr, "unknown tpm command %q\n\n%s", args[0], haUsage)
	return exitError(2)
}

// keyCreateHA handles the HA forms of "key create": --import-for (TPM provisioning)
// and --replicable (PKCS#11). handled is false for an ordinary key create.
func keyCreateHA(ctx context.Context, args []string, stdout, stderr io.Writer) (handled bool, err error) {
	for _, a := range args {
		name := strings.SplitN(strings.TrimLeft(a, "-"), "=", 2)[0]
		switch {
		case strings.HasPrefix(a, "-") && name == "import-for":
			rest := slices.DeleteFunc(slices.Clone(args), func(s string) bool { return s == "--backend=tpm" })
			if i := slices.Index(rest, "--backend"); i >= 0 && i+1 < len(rest) {
				if rest[i+1] != "tpm" {
					return true, errors.New("key create: --import-for needs --backend tpm")
				}
				rest = slices.Delete(rest, i, i+2)
			}
			return true, cmdProvision(rest, stdout, stderr, "key create")
		case strings.HasPrefix(a, "-") && name == "replicable":
			return true, cmdKeyCreateReplicable(ctx, args, stdout, stderr)
		}
	}
	return false, nil
}

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

func cmdProvision(args []string, stdout, stderr io.Writer, name string) error {
	fs := newFlags(name, stderr)
	importFor := fs.String("import-for", "", "comma-separated SRK public files (from hwkms tpm export-srk), one per node")
	outDir := fs.String("out-dir", "", "directory for the import blobs (created if missing)")
	escrowPub := fs.String("escrow-pub", "", "optional escrow public key (hwkms tpm escrow-keygen): also write DIR/escrow.import")
	authFile := fs.String("auth-file", "", "optional file with the KEK auth value (16-32 bytes); nodes then need tpm.authFile with it")
	ekRoots := fs.String("ek-roots", "", ekRootsUsage)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	trust, err := ekTrust(*ekRoots)
	if err != nil {
		return fmt.Errorf("%s: --ek-roots: %w", name, err)
	}
	pubs, outs, eks, err := importTargets(*importFor, *outDir, trust)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	var auth []byte
	if *authFile != "" {
		if auth, err = readAuthFile(*authFile); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		defer clear(auth)
	}
	m, err := provision.NewKEKMaterial(auth)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	defer m.Destroy()
	return writeBlobs(m, pubs, outs, eks, *outDir, *escrowPub, stdout, name)
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
	key, err := os.ReadFile(*escrowKey)
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
	fmt.Fprintf(stdout, "imported into TPM %s: %s\nkey_id: %s\n", *device, tpmWhere(info), info.KeyID)
	if bi, err := provision.InspectImportBlob(blob); err == nil && bi.EKName != nil {
		fmt.Fprintf(stdout, "the blob was bound to this TPM's EK %s and activated with it\n", hex.EncodeToString(bi.EKName))
	}
	return nil
}

func cmdKeyCreateReplicable(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("key create", stderr)
	path := fs.String("config", "", "path of the hwkms config file (required)")
	idx := fs.Int("key", 0, "index in keys[] of the key to create")
	fs.Bool("replicable", true, "create a PKCS#11 KEK that key replicate can copy (CKA_EXTRACTABLE true, CKA_SENSITIVE true)")
	trusted := fs.Bool("wrap-with-trusted", false, "also set CKA_WRAP_WITH_TRUSTED (only an SO-trusted key may wrap it)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	cfg, err := loadFor("key create", *path)
	if err != nil {
		return err
	}
	if *idx < 0 || *idx >= len(cfg.Keys) || cfg.Keys[*idx].PKCS11 == nil {
		return fmt.Errorf("key create: --replicable: keys[%d] must exist and be a pkcs11 key", *idx)
	}
	info, err := hsm.CreateReplicableKey(ctx, *cfg.Keys[*idx].PKCS11, hsm.ReplicableOptions{WrapWithTrusted: *trusted})
	if err != nil {
		return fmt.Errorf("key create: keys[%d]: %w", *idx, err)
	}
	fmt.Fprintf(stdout, "created replicable keys[%d] on pkcs11 token: label %q CKA_ID %s\nkey_id: %s\n", *idx, info.Label, info.CKAID, info.KeyID)
	return nil
}

func cmdKeyReplicate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("key replicate", stderr)
	path := fs.String("config", "", "config whose keys[--key] is the source")
	idx := fs.Int("key", 0, "source index")
	toPath := fs.String("to-config", "", "config whose keys[--to-key] names the destination token")
	toIdx := fs.Int("to-key", 0, "destination index")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	src, err := loadFor("key replicate", *path)
	if err != nil {
		return err
	}
	dst, err := loadFor("key replicate", *toPath)
	if err != nil {
		return err
	}
	if *idx < 0 || *idx >= len(src.Keys) || src.Keys[*idx].PKCS11 == nil ||
		*toIdx < 0 || *toIdx >= len(dst.Keys) || dst.Keys[*toIdx].PKCS11 == nil {
		return errors.New("key replicate: both keys must exist and be pkcs11 keys")
	}
	info, err := hsm.ReplicateKey(ctx, *src.Keys[*idx].PKCS11, *dst.Keys[*toIdx].PKCS11)
	if err != nil {
		return fmt.Errorf("key replicate: %w", err)
	}
	fmt.Fprintf(stdout, "replicated label %q CKA_ID %s\nkey_id: %s\n", info.Label, info.CKAID, info.KeyID)
	return nil
}

// cmdClusterCheck calls Status on every socket, then Encrypts a random seed on each
// and Decrypts it on every socket, and prints the matrix.
func cmdClusterCheck(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("cluster-check", stderr)
	sockets := fs.String("sockets", "", "comma-separated KMS v2 unix socket paths, one per node")
	timeout := fs.Duration("timeout", 5*time.Second, "deadline of each RPC")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *sockets == "" {
		return errors.New("cluster-check: --sockets is required")
	}
	paths := strings.Split(*sockets, ",")
	clients := make([]kmsapi.KeyManagementServiceClient, len(paths))
	for i, p := range paths {
		conn, client, err := dialKMS(p)
		if err != nil {
			return fmt.Errorf("cluster-check: %s: %w", p, err)
		}
		defer conn.Close()
		clients[i] = client
	}
	call := func() (context.Context, context.CancelFunc) { return context.WithTimeout(ctx, *timeout) }
	failed := false
	ids := make([]string, len(paths))
	tw := tabwriter.NewWriter(stdout, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tSOCKET\tHEALTHZ\tKEY_ID")
	for i, c := range clients {
		cctx, cancel := call()
		st, err := c.Status(cctx, &kmsapi.StatusRequest{})
		cancel()
		h := "-"
		switch {
		case err != nil:
			h, failed = "ERROR: "+err.Error(), true
		case st.Version != "v2" || st.Healthz != "ok":
			h, failed = fmt.Sprintf("%s (version %q)", st.Healthz, st.Version), true
			ids[i] = st.KeyId
		default:
			h, ids[i] = st.Healthz, st.KeyId
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", i, paths[i], h, ids[i])
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for i := range ids {
		if ids[i] != ids[0] {
			fmt.Fprintf(stdout, "MISMATCH: node %d reports key_id %q, node 0 %q\n", i, ids[i], ids[0])
			failed = true
		}
	}
	fmt.Fprintln(stdout, "\nencrypt on row, decrypt on column:")
	fmt.Fprint(tw, "ENC\\DEC")
	for j := range clients {
		fmt.Fprintf(tw, "\t%d", j)
	}
	fmt.Fprintln(tw)
	for i, enc := range clients {
		fmt.Fprintf(tw, "%d", i)
		seed := make([]byte, 32)
		if _, err := rand.Read(seed); err != nil {
			return err
		}
		uid := fmt.Sprintf("hwkms-cluster-check-%d", i)
		cctx, cancel := call()
		er, err := enc.Encrypt(cctx, &kmsapi.EncryptRequest{Plaintext: seed, Uid: uid})
		cancel()
		if err == nil && er.KeyId != ids[i] {
			err = fmt.Errorf("Encrypt key_id %q differs from Status %q", er.KeyId, ids[i])
		}
		if err != nil {
			failed = true
			for range clients {
				fmt.Fprint(tw, "\tENC-FAIL")
			}
			fmt.Fprintf(tw, "\t(%v)\n", err)
			continue
		}
		for _, dec := range clients {
			cctx, cancel := call()
			dr, err := dec.Decrypt(cctx, &kmsapi.DecryptRequest{Ciphertext: er.Ciphertext, Uid: uid, KeyId: er.KeyId, Annotations: er.Annotations})
			cancel()
			switch {
			case err != nil:
				failed = true
				fmt.Fprint(tw, "\tFAIL")
			case !bytes.Equal(dr.Plaintext, seed):
				failed = true
				fmt.Fprint(tw, "\tWRONG")
			default:
				fmt.Fprint(tw, "\tok")
			}
		}
		fmt.Fprintln(tw)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if failed {
		fmt.Fprintln(stdout, "cluster-check: FAILED")
		return exitError(1)
	}
	fmt.Fprintf(stdout, "cluster-check: ok, %d nodes, key_id %s\n", len(clients), ids[0])
	return nil
}

// readAuthFile reads a KEK auth value with the rules of tpm.Config.AuthFile.
func readAuthFile(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	switch {
	case bytes.HasSuffix(b, []byte("\r\n")):
		b = b[:len(b)-2]
	case bytes.HasSuffix(b, []byte("\n")):
		b = b[:len(b)-1]
	}
	return b, nil
}

// writeExcl writes a new file; it never overwrites.
func writeExcl(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
