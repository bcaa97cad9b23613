package main

// PKCS#11 replication (docs/ha.md): key create --replicable makes a KEK that
// key replicate copies to another token (C_WrapKey/C_UnwrapKey), so several nodes'
// HSMs hold the same key.

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin/config"
)

// createReplicable creates keys[idx] of cfg as a replicable PKCS#11 KEK (key create
// --replicable).
func createReplicable(ctx context.Context, cfg *config.Config, idx int, wrapWithTrusted bool, stdout io.Writer) error {
	if idx < 0 || idx >= len(cfg.Keys) || cfg.Keys[idx].PKCS11 == nil {
		return fmt.Errorf("key create: --replicable: keys[%d] must exist and be a pkcs11 key", idx)
	}
	info, err := hsm.CreateReplicableKey(ctx, *cfg.Keys[idx].PKCS11, hsm.ReplicableOptions{WrapWithTrusted: wrapWithTrusted})
	if err != nil {
		return fmt.Errorf("key create: keys[%d]: %w", idx, err)
	}
	fmt.Fprintf(stdout, "created replicable keys[%d] on pkcs11 token: label %q CKA_ID %s\nkey_id: %s\n", idx, info.Label, info.CKAID, info.KeyID)
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
