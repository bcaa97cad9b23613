package tpm

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/tpm/internal/wire"
)

const (
	nonceSize = 16
	// cleanupTimeout bounds best-effort flushes on error paths and in Close.
	cleanupTimeout = 2 * time.Second
)

var _ kek.KEK = (*KEK)(nil)

// KEK is a key-encryption key held in a TPM 2.0: a restricted-decrypt storage key
// under which Wrap seals each plaintext as a sealed-data object (see doc.go).
//
// A KEK owns one connection to the TPM and serialises every command on it; it is
// safe for concurrent use. Each call waits for the connection no longer than its
// ctx allows. When the connection or the TPM's state is lost (TPM or swtpm
// restart), the next call reconnects, runs TPM2_Startup if needed, reloads the KEK
// and recreates the sessions; calls fail with an error wrapping
// kek.ErrUnavailable until that succeeds. Close flushes every transient handle
// and session the KEK created and is idempotent; every method after Close returns
// an error wrapping kek.ErrClosed.
type KEK struct {
	// Immutable after Open.
	dev        device
	auth       []byte // KEK auth value; never logged or put in an error
	pcrs       []uint
	persistent tpm2.TPMHandle // 0 for the blob form
	blobPub    []byte         // TPMT_PUBLIC of the KEK (blob form)
	blobPriv   []byte         // TPM2B_PRIVATE contents of the KEK (blob form)
	name       []byte         // the KEK's TPM Name, pinned at Open (or by Config.KeyID)
	srkPin     []byte         // Config.SRKName, or nil (blob form: checked at every load)
	idPinned   bool           // name was set from Config.KeyID
	imported   bool           // an imported KEK (import.go): sealed objects have fixedTPM clear
	hmac       bool           // Config.Kind hmac (hmac.go)
	id         string

	closed     atomic.Bool
	reconnects atomic.Uint64 // successful connects after Open's
	line       *line         // shared connection on a TPM without a resource manager (line.go); nil on /dev/tpmrm*
	sem        chan struct{} // held while using the connection and the fields below; line.sem if line is set
	adm        *admission    // refuses calls that cannot finish in time (admission.go); &line.adm if line is set

	c            *conn
	kek          tpm2.TPMHandle // loaded KEK: the persistent handle or a transient one
	kekTransient bool
	kekPub       tpm2.TPMTPublic
	sIn          tpm2.Session // salted HMAC, AES-128-CFB command encryption, KEK auth
	sOut         tpm2.Session // salted HMAC, AES-128-CFB response encryption, KEK auth
	sPol         tpm2.Session // salted policy session, AES-128-CFB response encryption (PCR mode)
	needReset    bool         // a cleanup failed: rebuild the connection after this call
}

// Open connects to the TPM in cfg, loads the KEK (a persistent handle, or a blob
// file loaded under the owner SRK), and starts the KEK's salted sessions. On a TPM
// without a resource manager (anything but /dev/tpmrm*) it first flushes every
// transient object and session left by earlier processes.
func Open(ctx context.Context, cfg Config) (*KEK, error) {
	if err := cfg.Validate("tpm"); err != nil {
		return nil, err
	}
	dev, _ := parseDevice(cfg.Device)
	pcrs, _ := pcrList(cfg.PCRs)
	auth, err := readAuth(cfg.AuthFile)
	if err != nil {
		return nil, err
	}
	pin := cfg.pins()
	k := &KEK{dev: dev, auth: auth, pcrs: pcrs, srkPin: pin.srk, name: pin.kek, idPinned: pin.kek != nil,
		sem: make(chan struct{}, 1), adm: &admission{}, hmac: cfg.Kind == KindHMAC}
	if !dev.rm {
		k.line = acquireLine(dev)
		k.sem, k.adm = k.line.sem, &k.line.adm
	}
	k.adm.off.Store(cfg.DisableAdmission)
	if cfg.PersistentHandle != "" {
		k.persistent, _ = parseHandle(cfg.PersistentHandle)
	} else {
		pub, pubBytes, priv, err := readBlobFile(cfg.BlobFile)
		if err == nil {
			k.blobPub, k.blobPriv = pubBytes, priv
			if k.name, err = wire.ObjectName(pub); err != nil {
				err = fmt.Errorf("tpm: blobFile %s: %w: %w", cfg.BlobFile, ErrNotKEK, err)
			} else if err = checkKeyID(k.name, pin.kek, "blob file "+cfg.BlobFile); err != nil {
				err = fmt.Errorf("tpm: open: %w", err)
			}
		}
		if err != nil {
			k.abandon()
			return nil, err
		}
	}
	if err := k.openConnect(ctx); err != nil {
		k.abandon()
		return nil, fmt.Errorf("tpm: open %s: %w", dev, err)
	}
	k.id = wire.KeyID(k.name)
	k.imported = wire.IsImportedKEK(&k.kekPub)
	if err := k.selfTest(ctx); err != nil {
		k.Close()
		return nil, fmt.Errorf("tpm: open %s: self-test: %w", dev, err)
	}
	return k, nil
}

// openConnect is Open's first connect, under the semaphore: on a shared line another
// KEK may be using the TPM.
func (k *KEK) openConnect(ctx context.Context) error {
	select {
	case k.sem <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("waiting for the TPM: %w: %w", kek.ErrUnavailable, ctx.Err())
	}
	defer func() { <-k.sem }()
	_, err := k.connect(ctx)
	return err
}

// abandon releases what a failed Open holds: the auth value and its line reference.
func (k *KEK) abandon() {
	clear(k.auth)
	if k.line != nil {
		k.sem <- struct{}{}
		releaseLine(k.line)
		<-k.sem
	}
}

// selfTest wraps and unwraps a random value, so that a wrong auth value, an
// unusable PCR bank or a broken session fails Open rather than the first request.
func (k *KEK) selfTest(ctx context.Context) error {
	var probe [32]byte
	if _, err := rand.Read(probe[:]); err != nil {
		return err
	}
	aad := []byte("hwkms tpm self-test")
	body, err := k.Wrap(ctx, probe[:], aad)
	if err != nil {
		return err
	}
	got, err := k.Unwrap(ctx, body, aad)
	if err != nil {
		return err
	}
	defer clear(got)
	if subtle.ConstantTimeCompare(got, probe[:]) != 1 {
		return errors.New("unwrapped value differs")
	}
	return nil
}

// ID returns "tpm:" followed by the lowercase hex TPM Name of the KEK (nameAlg
// 0x000b || SHA-256 of its public area): stable across restarts, unique per key.
func (k *KEK) ID() string { return k.id }

// Backend returns kek.BackendTPM.
func (k *KEK) Backend() kek.Backend { return kek.BackendTPM }

// Close flushes the sessions and the transient KEK this KEK created and closes the
// connection. It waits for a call in progress. Idempotent.
func (k *KEK) Close() error {
	k.sem <- struct{}{}
	defer func() { <-k.sem }()
	if k.closed.Swap(true) {
		return nil
	}
	var err error
	if k.line == nil {
		err = k.teardown(context.Background())
	} else {
		if k.line.owner == k {
			if err = k.flushOwn(context.Background()); err != nil {
				k.line.drop()
			} else {
				k.forget()
				k.line.owner = nil
			}
		}
		err = errors.Join(err, releaseLine(k.line))
	}
	clear(k.auth)
	return err
}
