package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin/config"
	"github.com/hwkms/hwkms/tpm"
)

func cmdKeyCreate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("key create", stderr)
	path := fs.String("config", "", "path of the hwkms config file (required)")
	idx := fs.Int("key", 0, "index in keys[] of the key to create")
	backend := fs.String("backend", "", "pkcs11 or tpm: refuse unless keys[N] uses this backend")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	cfg, err := loadFor("key create", *path)
	if err != nil {
		return err
	}
	if *idx < 0 || *idx >= len(cfg.Keys) {
		return fmt.Errorf("key create: --key %d: config has keys[0..%d]", *idx, len(cfg.Keys)-1)
	}
	k := cfg.Keys[*idx]
	if *backend != "" && *backend != k.Backend() {
		return fmt.Errorf("key create: --backend %s, but keys[%d] in %s is a %s key", *backend, *idx, *path, k.Backend())
	}
	switch {
	case k.PKCS11 != nil:
		info, err := hsm.CreateKey(ctx, *k.PKCS11)
		if err != nil {
			return fmt.Errorf("key create: keys[%d]: %w", *idx, err)
		}
		fmt.Fprintf(stdout, "created keys[%d] on pkcs11 token: label %q CKA_ID %s\nkey_id: %s\n", *idx, info.Label, info.CKAID, info.KeyID)
		return nil
	case k.TPM != nil:
		info, err := tpm.CreateKey(ctx, *k.TPM)
		if err != nil {
			return fmt.Errorf("key create: keys[%d]: %w", *idx, err)
		}
		fmt.Fprintf(stdout, "created keys[%d] in TPM %s: %s\nkey_id: %s\n", *idx, k.TPM.Device, tpmWhere(info), info.KeyID)
		return nil
	}
	return fmt.Errorf("key create: keys[%d]: no backend block", *idx)
}

func cmdKeyList(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("key list", stderr)
	path := fs.String("config", "", "path of the hwkms config file (required)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	cfg, err := loadFor("key list", *path)
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(stdout, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "INDEX\tKEY_ID\tBACKEND\tROLE\tON DEVICE\tDETAIL")
	missing := 0
	for i, k := range cfg.Keys {
		role := "decrypt-only"
		if i == 0 {
			role = "primary"
		}
		keyID, present, detail := describeKey(ctx, k)
		if !present {
			missing++
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\n", i, keyID, k.Backend(), role, yesNo(present), detail)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if missing > 0 {
		return exitError(1)
	}
	return nil
}

// describeKey finds a configured key on its device without opening a KEK.
func describeKey(ctx context.Context, k config.Key) (keyID string, present bool, detail string) {
	switch {
	case k.PKCS11 != nil:
		c := *k.PKCS11
		keys, err := hsm.ListKeys(ctx, c)
		if err != nil {
			return "-", false, err.Error()
		}
		var match []hsm.KeyInfo
		for _, info := range keys {
			if info.Label == c.KeyLabel && (c.KeyCKAID == "" || info.CKAID == c.KeyCKAID) {
				match = append(match, info)
			}
		}
		switch len(match) {
		case 0:
			return "-", false, fmt.Sprintf("no key labelled %q", c.KeyLabel)
		case 1:
			d := fmt.Sprintf("label %q CKA_ID %s", match[0].Label, match[0].CKAID)
			if !match[0].Safe() {
				d += " UNSAFE: extractable or not sensitive"
			}
			return match[0].KeyID, true, d
		default:
			return "-", false, fmt.Sprintf("%d keys labelled %q; set keyCKAID", len(match), c.KeyLabel)
		}
	case k.TPM != nil:
		info, err := tpm.Probe(ctx, *k.TPM)
		if err != nil {
			return "-", false, err.Error()
		}
		return info.KeyID, true, tpmWhere(info)
	}
	return "-", false, "no backend block"
}

func tpmWhere(info tpm.KeyInfo) string {
	if info.Handle != "" {
		return "persistent handle " + info.Handle
	}
	return "blob file " + info.BlobFile
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "NO"
}

func loadFor(cmd, path string) (*config.Config, error) {
	if path == "" {
		return nil, errors.New(cmd + ": --config is required")
	}
	cfg, err := config.Load(path)
	if err != nil {
		return nil, err
	}
	if err := rememberRefusedPINs(cfg, false); err != nil {
		return nil, fmt.Errorf("%s: %w", cmd, err)
	}
	return cfg, nil
}
