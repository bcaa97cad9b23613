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
	"github.com/hwkms/hwkms/plugin/files"
	"github.com/hwkms/hwkms/softhsm"
	"github.com/hwkms/hwkms/tpm"
	"github.com/hwkms/hwkms/tpm/swtpm"
	"github.com/hwkms/hwkms/tpm/swtpm/latency"
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
	backend := fs.String("backend", "pkcs11", "backend of the throwaway KEK: pkcs11 (SoftHSM2) or tpm (swtpm)")
	devMech := fs.String("dev-mechanism", "", "dev/bench only, with --backend pkcs11: mechanism of the throwaway KEK, aes-gcm, aes-cbc-hmac or rsa-oaep (hsm.Config.Mechanism; default auto)")
	var dt devTPMOpts
	fs.StringVar(&dt.latency, "dev-tpm-latency", "", "dev/bench only, with --backend tpm: give swtpm a discrete TPM's speed (slb9670: Infineon SLB 9670, docs/BENCHMARKS.md), one command at a time")
	fs.StringVar(&dt.kind, "dev-tpm-kind", "", "with --backend tpm: kind of the throwaway KEK, sealed (default) or hmac (tpm.Config.Kind)")
	fs.BoolVar(&dt.noAdmission, "dev-tpm-no-admission", false, "dev/bench only, with --backend tpm: let calls queue past their deadline instead of refusing them at once (tpm.Config.DisableAdmission)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *backend != "pkcs11" && *backend != "tpm" {
		return fmt.Errorf("dev: --backend %q: supported backends are pkcs11 and tpm", *backend)
	}
	if (dt.latency != "" || dt.noAdmission || dt.kind != "") && *backend != "tpm" {
		return fmt.Errorf("dev: --dev-tpm-latency, --dev-tpm-kind and --dev-tpm-no-admission need --backend tpm")
	}
	if *devMech != "" && *backend != "pkcs11" {
		return fmt.Errorf("dev: --dev-mechanism needs --backend pkcs11")
	}
	if err := checkDevMechanism(*devMech); err != nil {
		return fmt.Errorf("dev: --dev-mechanism %q: %w", *devMech, err)
	}
	if _, ok := latency.Profiles[dt.latency]; dt.latency != "" && !ok {
		return fmt.Errorf("dev: --dev-tpm-latency %q: known profiles: slb9670", dt.latency)
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
	var key config.Key
	switch *backend {
	case "pkcs11":
		key, err = devPKCS11(ctx, work, *devMech)
	case "tpm":
		var stop func()
		stop, key, err = devTPM(ctx, work, dt)
		if stop != nil {
			defer stop()
		}
	}
	if err != nil {
		return fmt.Errorf("dev: %w", err)
	}
	cfg, cfgPath, err := devConfig(work, sock, *logLevel, key)
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
	fmt.Fprintf(stdout, devBanner, *backend, work, cfgPath, sock, sock, sock)
	if env := os.Getenv(softhsm.ConfEnv); env != "" && *dir != "" {
		fmt.Fprintf(stdout, devServeAgain, softhsm.ConfEnv+"="+env, cfgPath)
	}
	return <-errc
}

// checkDevMechanism accepts the mechanisms a throwaway SoftHSM2 key can serve with:
// "" (auto), aes-gcm, aes-cbc-hmac and rsa-oaep. aes-gcm-token-iv is refused: SoftHSM2
// leaves a token-generated GCM IV all zero, so Open's round trip fails on it
// (hsm/doc.go); hsm's BenchmarkMechanism measures it on a CloudHSM emulation instead.
func checkDevMechanism(m string) error {
	switch m {
	case "", hsm.MechanismAuto, hsm.MechanismAESGCM, hsm.MechanismAESCBCHMAC, hsm.MechanismRSAOAEP:
		return nil
	case hsm.MechanismAESGCMTokenIV:
		return fmt.Errorf("SoftHSM2 does not generate GCM IVs (it leaves them zero); BenchmarkMechanism in package hsm measures %s on an emulation", m)
	}
	return fmt.Errorf("supported: %s, %s, %s, %s", hsm.MechanismAuto, hsm.MechanismAESGCM, hsm.MechanismAESCBCHMAC, hsm.MechanismRSAOAEP)
}

// devPKCS11 creates a SoftHSM2 token with a random PIN in dir and a KEK on it with
// mechanism mech ("" for auto). SOFTHSM2_CONF is set for this process before the
// module loads.
func devPKCS11(ctx context.Context, dir, mech string) (config.Key, error) {
	fx, err := softhsm.New(filepath.Join(dir, "softhsm"))
	if err != nil {
		return config.Key{}, err
	}
	if err := os.Setenv(softhsm.ConfEnv, fx.ConfPath); err != nil {
		return config.Key{}, err
	}
	pin, soPIN := randomHex(16), randomHex(16)
	pinFile := filepath.Join(dir, "user.pin")
	if err := files.WriteFile(pinFile, []byte(pin+"\n"), files.WriteOptions{Mode: 0o600}); err != nil {
		return config.Key{}, err
	}
	if _, err := fx.InitToken(devTokenLabel, soPIN, pin); err != nil {
		return config.Key{}, err
	}
	key := hsm.Config{Module: fx.Module, TokenLabel: devTokenLabel, PINFile: pinFile, KeyLabel: devKeyLabel, Mechanism: mech}
	if _, err := hsm.CreateKey(ctx, key); err != nil {
		return config.Key{}, err
	}
	return config.Key{PKCS11: &key}, nil
}

// devTPMOpts are the dev-only TPM flags.
type devTPMOpts struct {
	latency     string // a latency.Profiles name, or ""
	kind        string // tpm.Config.Kind
	noAdmission bool
}

// devTPM starts a throwaway swtpm with its state in dir and creates a KEK in it, kept
// as a blob file with a random auth value. With o.latency the KEK is served through a
// latency proxy (package tpm/swtpm/latency) at that TPM's speed; the key is created
// directly on swtpm. The caller calls stop.
func devTPM(ctx context.Context, dir string, o devTPMOpts) (stop func(), _ config.Key, _ error) {
	sim, err := swtpm.Start(ctx, filepath.Join(dir, "swtpm"))
	if err != nil {
		return nil, config.Key{}, err
	}
	stop = func() { sim.Close() }
	authFile := filepath.Join(dir, "kek.auth")
	if err := files.WriteFile(authFile, []byte(randomHex(16)), files.WriteOptions{Mode: 0o600}); err != nil {
		return stop, config.Key{}, err
	}
	key := tpm.Config{Device: sim.Device, BlobFile: filepath.Join(dir, "kek.blob"), AuthFile: authFile, Kind: o.kind, DisableAdmission: o.noAdmission}
	if _, err := tpm.CreateKey(ctx, key); err != nil {
		return stop, config.Key{}, err
	}
	if o.latency != "" {
		x, err := latency.StartFor(sim.Device, latency.Profiles[o.latency])
		if err != nil {
			return stop, config.Key{}, err
		}
		stop = func() { x.Close(); sim.Close() }
		key.Device = x.Device
	}
	return stop, config.Key{TPM: &key}, nil
}

// devConfig writes the config that serves key on sock into dir and loads it back, so
// dev mode runs exactly what the file says, defaults included.
func devConfig(dir, sock, logLevel string, key config.Key) (*config.Config, string, error) {
	cfg := &config.Config{
		Socket: config.Socket{Path: sock},
		Log:    config.Log{Level: logLevel},
		Keys:   []config.Key{key},
	}
	data, err := yaml.Marshal(cfg)
	if err != nil {
		return nil, "", err
	}
	cfgPath := filepath.Join(dir, "hwkms.yaml")
	if err := files.WriteFile(cfgPath, data, files.WriteOptions{Mode: 0o600}); err != nil {
		return nil, "", err
	}
	loaded, err := config.Load(cfgPath)
	if err != nil {
		return nil, "", err
	}
	return loaded, cfgPath, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand.Read never fails on Linux
	}
	return hex.EncodeToString(b)
}

const devBanner = `hwkms dev: serving KMS v2 with a throwaway %s KEK (stop with Ctrl-C).
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

// devServeAgain tells how to serve the dev config again without recreating the key.
const devServeAgain = `To serve this token again later (with --dir kept), SoftHSM2 must find its token directory:
  %s hwkms serve --config %s
`
