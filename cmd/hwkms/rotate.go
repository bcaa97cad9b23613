package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/hwkms/hwkms/plugin/config"
	"github.com/hwkms/hwkms/plugin/files"
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
	migrateNow := fs.Bool("migrate", false, "with --apply: once the running hwkms serves the new key, run storage migrate with the flags after -- (its --key-id is the new key's; --retries defaults to 5): the whole rotation on a single control plane, or on the last node of several")
	socket := fs.String("socket", "", "with --migrate: hwkms's KMS v2 socket, whose Status must report the new key_id before migrating (default: the config's socket.path)")
	reloadTimeout := fs.Duration("reload-timeout", 2*time.Minute, "with --migrate: how long to wait for the running hwkms to serve the new key")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *migrateNow && !*apply {
		return errors.New("key rotate: --migrate needs --apply (the running hwkms must serve the new key before objects are rewritten under it)")
	}
	if !*migrateNow && fs.NArg() > 0 {
		return fmt.Errorf("key rotate: unexpected arguments %q (storage migrate flags go after -- with --migrate)", fs.Args())
	}
	cfg, err := loadFor("key rotate", *path)
	if err != nil {
		return err
	}
	// A timestamp for humans plus a random suffix, so two rotations in one second differ.
	stamp := time.Now().UTC().Format("20060102T150405Z") + "-" + randomHex(3)
	primary := cfg.Keys[0]
	b, err := primary.Resolve()
	if err != nil {
		return fmt.Errorf("key rotate: keys[0]: %w", err)
	}
	created, err := b.Rotate(ctx, config.RotateOptions{Stamp: stamp, Label: *label, BlobFile: *blob, PersistentHandle: *handle})
	if err != nil {
		return fmt.Errorf("key rotate: %w", err)
	}
	next, keyID := created.Key, created.KeyID

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
		if _, err := stdout.Write(data); err != nil {
			return err
		}
		printMigrateHint(stderr, keyID)
		return nil
	}
	if err := writeFileAtomic(*path, data); err != nil {
		return fmt.Errorf("key rotate: %w", err)
	}
	fmt.Fprintf(stderr, "wrote %s; a running hwkms reloads it on its own (or send SIGHUP). Next: docs/rotation.md step 3.\n", *path)
	if !*migrateNow {
		printMigrateHint(stderr, keyID)
		fmt.Fprintln(stdout, keyID)
		return nil
	}
	fmt.Fprintln(stdout, keyID)
	sock := *socket
	if sock == "" {
		sock = rotated.Socket.Path
	}
	if err := waitServing(ctx, sock, keyID, *reloadTimeout); err != nil {
		printMigrateHint(stderr, keyID)
		return fmt.Errorf("key rotate: the config is written, but storage was not migrated: %w", err)
	}
	fmt.Fprintf(stderr, "hwkms on %s serves key_id %s; kube-apiserver switches at its next Status poll (within 60 s): objects it writes before that are found by the audit and migrated again (--retries)\n", sock, keyID)
	if err := runStorageMigrate(ctx, migrateArgs(keyID, fs.Args()), stdout, stderr); err != nil {
		return fmt.Errorf("key rotate: the new key is primary, migration not finished (re-run storage migrate): %w", err)
	}
	return nil
}

// migrateArgs are the storage migrate arguments key rotate --migrate passes: the new
// key_id, 5 retries unless the operator chose, then the operator's flags.
func migrateArgs(keyID string, extra []string) []string {
	args := []string{"--key-id", keyID}
	retries := false
	for _, a := range extra {
		if a == "--retries" || a == "-retries" || strings.HasPrefix(a, "--retries=") || strings.HasPrefix(a, "-retries=") {
			retries = true
		}
	}
	if !retries {
		args = append(args, "--retries", "5")
	}
	return append(args, extra...)
}

// waitServing polls Status on socket until it reports keyID (the running hwkms has
// reloaded the rotated config), at most timeout.
func waitServing(ctx context.Context, socket, keyID string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	last := ""
	for {
		id, err := statusKeyID(ctx, socket)
		if err == nil && id == keyID {
			return nil
		}
		if err != nil {
			last = err.Error()
		} else {
			last = "it serves key_id " + id
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("hwkms on %s did not serve key_id %s within %v (%s)", socket, keyID, timeout, last)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// printMigrateHint prints the command that finishes a rotation: once every node serves
// keyID and every kube-apiserver writes with it (docs/rotation.md step 3), storage
// migrate rewrites the stored objects under it and audits. key rotate does not run it
// itself: it acts on one node's device, while the migration is cluster-wide and must
// wait until every node has rotated and every kube-apiserver polled Status again.
func printMigrateHint(w io.Writer, keyID string) {
	fmt.Fprintf(w, "When every kube-apiserver writes with key_id %s (docs/rotation.md step 3), rewrite the stored objects under it and audit (step 4):\n"+
		"  hwkms storage migrate --encryption-provider-config <kube-apiserver's file> --key-id %s --etcd-servers <kube-apiserver's --etcd-servers and --etcd-* flags>\n", keyID, keyID)
}

// configuredAs reports whether the configured key k is (or, for a label that several
// keys share, may be) the key with key_id target (config.Backend.Is).
func configuredAs(ctx context.Context, k config.Key, target string) (bool, error) {
	b, err := k.Resolve()
	if err != nil {
		return false, err
	}
	return b.Is(ctx, target)
}

func describeID(ctx context.Context, k config.Key) string { return describeKey(ctx, k).KeyID }

// writeFileAtomic replaces path with data (files.WriteFile), keeping the mode of the
// file it replaces (0600 for a new one).
func writeFileAtomic(path string, data []byte) error {
	mode := os.FileMode(0o600)
	if fi, err := os.Stat(path); err == nil {
		mode = fi.Mode().Perm()
	}
	return files.WriteFile(path, data, files.WriteOptions{Mode: mode})
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
	var key config.Key
	var d config.Description
	switch {
	case *blob != "" || *handle != "":
		key = config.TPMKey(cfg, *device, *blob, *handle)
		if d = describeKey(ctx, key); d.Err != nil {
			return fmt.Errorf("key destroy: %w", d.Err)
		}
	case *keyID != "":
		if key, d, err = config.FindKey(ctx, cfg, *keyID); err != nil {
			return fmt.Errorf("key destroy: %w", err)
		}
	default:
		return errors.New("key destroy: pass --key-id (pkcs11) or --tpm-blob-file/--tpm-persistent-handle")
	}
	b, err := key.Resolve()
	if err != nil {
		return fmt.Errorf("key destroy: %w", err)
	}
	target, where, effect := d.KeyID, d.Where, d.DestroyEffect
	if effect == "" {
		effect = "Everything encrypted under it becomes unreadable, forever."
	}
	destroy := func() error { return b.Destroy(ctx) }
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
		fmt.Fprintf(stderr, "About to destroy key_id %s (%s).\n%s\nType the key_id to confirm: ", target, where, effect)
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

// yamlMarshal writes a config as YAML.
func yamlMarshal(cfg *config.Config) ([]byte, error) { return yaml.Marshal(cfg) }
