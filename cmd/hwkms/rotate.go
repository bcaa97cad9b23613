package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin/config"
	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/tpm"
)

// cmdKeyRotate creates a new key on the primary's device and makes it the primary in
// the config (printed, or written with --apply). The running hwkms reloads the file.
func cmdKeyRotate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("key rotate", stderr)
	path := fs.String("config", "", "path of the hwkms config file (required)")
	label := fs.String("label", "", "pkcs11: label of the new key (default hwkms-kek-<UTC timestamp>-<random>)")
	blob := fs.String("blob-file", "", "tpm: blob file of the new key (default kek-<UTC timestamp>-<random>.blob beside the current one)")
	handle := fs.String("persistent-handle", "", "tpm: persistent handle of the new key (required when the primary uses a persistent handle)")
	apply := fs.Bool("apply", false, "write the new config to --config (atomically; comments are not kept) instead of printing it")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	cfg, err := loadFor("key rotate", *path)
	if err != nil {
		return err
	}
	// A timestamp for humans plus a random suffix, so two rotations in one second differ.
	stamp := time.Now().UTC().Format("20060102T150405Z") + "-" + randomHex(3)
	primary := cfg.Keys[0]
	var next config.Key
	var keyID string
	switch {
	case primary.PKCS11 != nil:
		c := *primary.PKCS11
		c.KeyLabel, c.KeyCKAID = *label, ""
		if c.KeyLabel == "" {
			c.KeyLabel = "hwkms-kek-" + stamp
		}
		info, err := hsm.CreateKey(ctx, c)
		if err != nil {
			return fmt.Errorf("key rotate: create key on the primary's token: %w", err)
		}
		next, keyID = config.Key{PKCS11: &c}, info.KeyID
		c.KeyCKAID = info.CKAID // pin the exact key, in case the label is ever reused
	case primary.TPM != nil:
		c := *primary.TPM
		switch {
		case c.PersistentHandle != "":
			if *handle == "" {
				return errors.New("key rotate: the primary uses a persistent handle; pass --persistent-handle for the new key")
			}
			c.PersistentHandle = *handle
		default:
			c.BlobFile = *blob
			if c.BlobFile == "" {
				c.BlobFile = filepath.Join(filepath.Dir(primary.TPM.BlobFile), "kek-"+stamp+".blob")
			}
		}
		info, err := tpm.CreateKey(ctx, c)
		if err != nil {
			return fmt.Errorf("key rotate: create key in the primary's TPM: %w", err)
		}
		next, keyID = config.Key{TPM: &c}, info.KeyID
	default:
		return errors.New("key rotate: keys[0] has no backend block")
	}

	rotated := *cfg
	rotated.Keys = append([]config.Key{next}, cfg.Keys...)
	data, err := yamlMarshal(&rotated)
	if err != nil {
		return fmt.Errorf("key rotate: %w", err)
	}
	if _, err := config.Parse(data); err != nil {
		return fmt.Errorf("key rotate: the rotated config does not validate: %w", err)
	}
	fmt.Fprintf(stderr, "created new primary key_id %s; the previous primary %s stays as decrypt-only\n", keyID, describeID(ctx, primary))
	if !*apply {
		fmt.Fprintf(stderr, "new config (write it to %s, or rerun with --apply):\n", *path)
		_, err := stdout.Write(data)
		return err
	}
	if err := writeFileAtomic(*path, data); err != nil {
		return fmt.Errorf("key rotate: %w", err)
	}
	fmt.Fprintf(stderr, "wrote %s; a running hwkms reloads it on its own (or send SIGHUP). Next: docs/rotation.md step 3.\n", *path)
	fmt.Fprintln(stdout, keyID)
	return nil
}

// configuredAs reports whether the configured key k is (or, for a label that several
// keys share, may be) the key with key_id target. It fails closed: a device it cannot
// ask is an error, not a "no". A key that does not exist is not target.
func configuredAs(ctx context.Context, k config.Key, target string) (bool, error) {
	switch {
	case k.PKCS11 != nil:
		keys, err := hsm.ListKeys(ctx, *k.PKCS11)
		if err != nil {
			return false, err
		}
		for _, info := range keys {
			if info.Label == k.PKCS11.KeyLabel && (k.PKCS11.KeyCKAID == "" || info.CKAID == k.PKCS11.KeyCKAID) && info.KeyID == target {
				return true, nil
			}
		}
		return false, nil
	case k.TPM != nil:
		info, err := tpm.Probe(ctx, *k.TPM)
		switch {
		case errors.Is(err, kek.ErrKeyNotFound), errors.Is(err, fs.ErrNotExist):
			return false, nil
		case err != nil:
			return false, err
		}
		return info.KeyID == target, nil
	}
	return false, errors.New("no backend block")
}

func describeID(ctx context.Context, k config.Key) string {
	id, _, _ := describeKey(ctx, k)
	return id
}

// writeFileAtomic replaces path with data: a temp file in the same directory with the
// same mode, fsync, rename, fsync of the directory.
func writeFileAtomic(path string, data []byte) error {
	mode := os.FileMode(0o600)
	if fi, err := os.Stat(path); err == nil {
		mode = fi.Mode().Perm()
	}
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after a successful rename
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// cmdKeyDestroy destroys a key that is no longer in the config, after confirmation.
func cmdKeyDestroy(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := newFlags("key destroy", stderr)
	path := fs.String("config", "", "path of the hwkms config file (required): the key must not be in it")
	keyID := fs.String("key-id", "", "key_id of the key to destroy (pkcs11: searched on the tokens the config uses)")
	blob := fs.String("tpm-blob-file", "", "tpm: blob file of the key to destroy")
	handle := fs.String("tpm-persistent-handle", "", "tpm: persistent handle of the key to destroy")
	device := fs.String("tpm-device", "", "tpm: device (default: the device of the first tpm key in the config)")
	confirm := fs.String("confirm", "", "the key_id again, to skip the interactive confirmation")
	storageGuard := destroyGuard(fs) // storage.go: audit etcd, refuse while objects are stored under the key
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	cfg, err := loadFor("key destroy", *path)
	if err != nil {
		return err
	}
	// Find the target and its key_id.
	var destroy func() error
	var target, where string
	switch {
	case *blob != "" || *handle != "":
		c := tpm.Config{Device: *device, BlobFile: *blob, PersistentHandle: *handle}
		for _, k := range cfg.Keys {
			if c.Device == "" && k.TPM != nil {
				c.Device = k.TPM.Device
			}
		}
		info, err := tpm.Probe(ctx, c)
		if err != nil {
			return fmt.Errorf("key destroy: %w", err)
		}
		target, where = info.KeyID, "TPM "+c.Device+" "+tpmWhere(info)
		destroy = func() error { return tpm.DestroyKey(ctx, c) }
	case *keyID != "":
		c, info, err := findPKCS11Key(ctx, cfg, *keyID)
		if err != nil {
			return fmt.Errorf("key destroy: %w", err)
		}
		target, where = info.KeyID, fmt.Sprintf("token %q label %q CKA_ID %s", c.TokenLabel+c.TokenSerial, info.Label, info.CKAID)
		destroy = func() error { return hsm.DestroyKey(ctx, c) }
	default:
		return errors.New("key destroy: pass --key-id (pkcs11) or --tpm-blob-file/--tpm-persistent-handle")
	}
	if *keyID != "" && *keyID != target {
		return fmt.Errorf("key destroy: the selected key has key_id %s, not %s", target, *keyID)
	}
	for i, k := range cfg.Keys {
		is, err := configuredAs(ctx, k, target)
		if err != nil {
			return fmt.Errorf("key destroy: cannot tell whether keys[%d] in %s is key_id %s, so nothing was destroyed: %w", i, *path, target, err)
		}
		if is {
			return fmt.Errorf("key destroy: key_id %s is keys[%d] in %s; remove it from the config, let hwkms reload, and confirm no stored data uses it (docs/rotation.md) first", target, i, *path)
		}
	}
	if err := storageGuard(ctx, target, stderr); err != nil {
		return err
	}
	if *confirm == "" {
		fmt.Fprintf(stderr, "About to destroy key_id %s (%s).\nEverything encrypted under it becomes unreadable, forever.\nType the key_id to confirm: ", target, where)
		line, _ := bufio.NewReader(stdin).ReadString('\n')
		*confirm = strings.TrimSpace(line)
	}
	if *confirm != target {
		return errors.New("key destroy: not confirmed; nothing destroyed")
	}
	if err := destroy(); err != nil {
		return fmt.Errorf("key destroy: %w", err)
	}
	fmt.Fprintf(stdout, "destroyed key_id %s\n", target)
	return nil
}

// findPKCS11Key searches the tokens used by the config's pkcs11 keys for keyID and
// returns a config selecting exactly that key.
func findPKCS11Key(ctx context.Context, cfg *config.Config, keyID string) (hsm.Config, hsm.KeyInfo, error) {
	for _, k := range cfg.Keys {
		if k.PKCS11 == nil {
			continue
		}
		keys, err := hsm.ListKeys(ctx, *k.PKCS11)
		if err != nil {
			return hsm.Config{}, hsm.KeyInfo{}, err
		}
		for _, info := range keys {
			if info.KeyID == keyID {
				c := *k.PKCS11
				c.KeyLabel, c.KeyCKAID = info.Label, info.CKAID
				return c, info, nil
			}
		}
	}
	return hsm.Config{}, hsm.KeyInfo{}, fmt.Errorf("no key with key_id %s on the tokens this config uses", keyID)
}

// yamlMarshal writes a config as YAML.
func yamlMarshal(cfg *config.Config) ([]byte, error) { return yaml.Marshal(cfg) }
