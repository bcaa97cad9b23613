package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/hwkms/hwkms/plugin/config"
)

// cmdKeyCreate creates keys[N] on its device; with --replicable as a PKCS#11 KEK key
// replicate can copy, with --import-for (tpm) it provisions import blobs instead (tpm
// provision).
func cmdKeyCreate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("key create", stderr)
	path := fs.String("config", "", "path of the hwkms config file (required)")
	idx := fs.Int("key", 0, "index in keys[] of the key to create")
	backend := fs.String("backend", "", "pkcs11 or tpm: refuse unless keys[N] uses this backend")
	replicable := fs.Bool("replicable", false, "create a PKCS#11 KEK that key replicate can copy (CKA_EXTRACTABLE true, CKA_SENSITIVE true)")
	trusted := fs.Bool("wrap-with-trusted", false, "with --replicable: also set CKA_WRAP_WITH_TRUSTED (only an SO-trusted key may wrap it)")
	prov := addProvisionFlags(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	switch {
	case set["import-for"]:
		// tpm provision: no config, no device.
		if *backend != "" && *backend != "tpm" {
			return errors.New("key create: --import-for needs --backend tpm")
		}
		for _, n := range []string{"config", "key", "replicable", "wrap-with-trusted"} {
			if set[n] {
				return fmt.Errorf("key create: --import-for (tpm provision) does not take --%s", n)
			}
		}
		return provisionKEK(prov, stdout, "key create")
	case *trusted && !*replicable:
		return errors.New("key create: --wrap-with-trusted needs --replicable")
	}
	for _, n := range []string{"out-dir", "escrow-pub", "auth-file", "ek-roots"} {
		if set[n] {
			return fmt.Errorf("key create: --%s needs --import-for", n)
		}
	}
	cfg, err := loadFor("key create", *path)
	if err != nil {
		return err
	}
	if *replicable {
		if *backend != "" && *backend != "pkcs11" {
			return errors.New("key create: --replicable needs a pkcs11 key")
		}
		return createReplicable(ctx, cfg, *idx, *trusted, stdout)
	}
	if *idx < 0 || *idx >= len(cfg.Keys) {
		return fmt.Errorf("key create: --key %d: config has keys[0..%d]", *idx, len(cfg.Keys)-1)
	}
	k := cfg.Keys[*idx]
	if *backend != "" && *backend != k.Backend() {
		return fmt.Errorf("key create: --backend %s, but keys[%d] in %s is a %s key", *backend, *idx, *path, k.Backend())
	}
	b, err := k.Resolve()
	if err != nil {
		return fmt.Errorf("key create: keys[%d]: %w", *idx, err)
	}
	created, err := b.Create(ctx)
	if err != nil {
		return fmt.Errorf("key create: keys[%d]: %w", *idx, err)
	}
	fmt.Fprintf(stdout, "created keys[%d] %s\nkey_id: %s\n", *idx, created.Where, created.KeyID)
	return nil
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
		d := describeKey(ctx, k)
		if !d.Present {
			missing++
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\n", i, d.KeyID, k.Backend(), role, yesNo(d.Present), d.Detail)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if missing > 0 {
		return exitError(1)
	}
	return nil
}

// describeKey finds a configured key on its device. A pkcs11 key that is there is also
// opened once, as serve would, to show the mechanism the token lets it use.
func describeKey(ctx context.Context, k config.Key) config.Description {
	b, err := k.Resolve()
	if err != nil {
		return config.Description{KeyID: "-", Detail: "no backend block", Err: err}
	}
	return b.Describe(ctx)
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
	if err := cfg.RememberRefusedPINs(false); err != nil {
		return nil, fmt.Errorf("%s: %w", cmd, err)
	}
	return cfg, nil
}
