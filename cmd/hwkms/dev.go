package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"sigs.k8s.io/yaml"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin/config"
	"github.com/hwkms/hwkms/softhsm"
)

// devTokenLabel and devKeyLabel name what dev mode creates in its throwaway token.
const (
	devTokenLabel = "hwkms-dev"
	devKeyLabel   = "hwkms-dev-kek"
)

func cmdDev(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("dev", stderr)
	socket := fs.String("socket", "./.dev/kms.sock", "path of the unix socket to serve")
	dir := fs.String("dir", "", "directory for the throwaway token and config (default: a new temp dir, removed on exit)")
	logLevel := fs.String("log-level", "info", "log level: debug, info, warn, error")
	backend := fs.String("backend", "pkcs11", "backend of the throwaway KEK: pkcs11 (SoftHSM2)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *backend != "pkcs11" {
		return fmt.Errorf("dev: --backend %q: supported backends are pkcs11", *backend)
	}
	sock, err := filepath.Abs(*socket)
	if err != nil {
		return fmt.Errorf("dev: socket path: %w", err)
	}
	work := *dir
	if work == "" {
		work, err = os.MkdirTemp("", "hwkms-dev-")
		if err != nil {
			return fmt.Errorf("dev: %w", err)
		}
		defer os.RemoveAll(work)
	} else if err := os.MkdirAll(work, 0o700); err != nil {
		return fmt.Errorf("dev: %w", err)
	}
	cfg, cfgPath, err := devSetup(ctx, work, sock, *logLevel)
	if err != nil {
		return fmt.Errorf("dev: %w", err)
	}
	log := cfg.Logger(stderr)
	ready := make(chan struct{})
	errc := make(chan error, 1)
	go func() { errc <- serve(ctx, cfg, cfgPath, log, ready) }()
	select {
	case err := <-errc:
		return fmt.Errorf("dev: %w", err)
	case <-ready:
	}
	fmt.Fprintf(stdout, devBanner, work, cfgPath, sock, sock, sock)
	return <-errc
}

// devSetup creates a SoftHSM2 token with a random PIN in dir, a KEK on it, and the
// config that serves it. SOFTHSM2_CONF is set for this process before the module loads.
func devSetup(ctx context.Context, dir, sock, logLevel string) (*config.Config, string, error) {
	fx, err := softhsm.New(filepath.Join(dir, "softhsm"))
	if err != nil {
		return nil, "", err
	}
	if err := os.Setenv(softhsm.ConfEnv, fx.ConfPath); err != nil {
		return nil, "", err
	}
	pin, soPIN := randomHex(16), randomHex(16)
	pinFile := filepath.Join(dir, "user.pin")
	if err := os.WriteFile(pinFile, []byte(pin+"\n"), 0o600); err != nil {
		return nil, "", err
	}
	if _, err := fx.InitToken(devTokenLabel, soPIN, pin); err != nil {
		return nil, "", err
	}
	key := hsm.Config{Module: fx.Module, TokenLabel: devTokenLabel, PINFile: pinFile, KeyLabel: devKeyLabel}
	if _, err := hsm.CreateKey(ctx, key); err != nil {
		return nil, "", err
	}
	cfg := &config.Config{
		Socket: config.Socket{Path: sock},
		Log:    config.Log{Level: logLevel},
		Keys:   []config.Key{{PKCS11: &key}},
	}
	data, err := yaml.Marshal(cfg)
	if err != nil {
		return nil, "", err
	}
	cfgPath := filepath.Join(dir, "hwkms.yaml")
	if err := os.WriteFile(cfgPath, data, 0o600); err != nil {
		return nil, "", err
	}
	// Parse it back, so dev mode runs exactly what the file says, defaults included.
	cfg, err = config.Load(cfgPath)
	if err != nil {
		return nil, "", err
	}
	return cfg, cfgPath, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand.Read never fails on Linux
	}
	return hex.EncodeToString(b)
}

const devBanner = `hwkms dev: serving KMS v2 on a throwaway SoftHSM2 token (stop with Ctrl-C).
  work dir: %s
  config:   %s
  socket:   %s

Paste this into kube-apiserver's --encryption-provider-config:

apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources:
      - secrets
    providers:
      - kms:
          apiVersion: v2
          name: hwkms
          endpoint: unix://%s
          timeout: 3s
      - identity: {}

Check it with: hwkms status --socket %s
`
