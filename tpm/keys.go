package tpm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/google/go-tpm/tpm2"
	"github.com/hwkms/hwkms/plugin/files"
	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/tpm/internal/wire"
)

// KeyInfo describes a KEK on a TPM.
type KeyInfo struct {
	// KeyID is the key_id reported to kube-apiserver: "tpm:" + hex(Name).
	KeyID string
	// Name is the KEK's TPM Name: nameAlg (0x000b, SHA-256) || SHA-256(TPMT_PUBLIC).
	Name []byte
	// Handle is the persistent handle ("0x81010010"), or "" for the blob form.
	Handle string
	// BlobFile is the blob file path, or "" for the persistent form.
	BlobFile string
	// FixedTPM is the KEK's fixedTPM attribute: set for a KEK made in this TPM by
	// CreateKey (it cannot exist outside this TPM, except as its blob, which loads
	// only here); clear for an imported KEK (ImportKey: the ceremony made it outside
	// any TPM, and every TPM that imported it, and its escrow blob, hold it too).
	FixedTPM bool
}

// CreateKey creates a new KEK under the owner-hierarchy SRK (created from the TCG
// ECC P-256 SRK template with TPM2_CreatePrimary, Part 3 section 24.1): an ECC
// P-256 restricted-decrypt storage key, AES-128-CFB, nameAlg SHA-256,
// fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|noDA|restricted|decrypt,
// with the auth value from cfg.AuthFile (sent encrypted in a salted session). It then
// makes it persistent at cfg.PersistentHandle (TPM2_EvictControl, section 28.5) or
// writes cfg.BlobFile (format in doc.go, mode 0600, created atomically). It never
// overwrites: an occupied handle or an existing file gives kek.ErrKeyExists.
// The owner hierarchy's auth value must be empty. The SRK is checked (checkSRK:
// Name, template, cfg.SRKName) before the session carrying the auth value is salted
// to it. A cfg with KeyID set is refused: a new key cannot have a given key_id.
func CreateKey(ctx context.Context, cfg Config) (KeyInfo, error) {
	if err := cfg.Validate("tpm"); err != nil {
		return KeyInfo{}, err
	}
	if cfg.KeyID != "" {
		return KeyInfo{}, fmt.Errorf("tpm: create: keyID is set (%s): it pins an existing key; remove it to create a new one", cfg.KeyID)
	}
	dev, _ := parseDevice(cfg.Device)
	auth, err := readAuth(cfg.AuthFile)
	if err != nil {
		return KeyInfo{}, err
	}
	defer clear(auth)
	t, err := openKeyTarget(ctx, cfg, dev, "create")
	if err != nil {
		return KeyInfo{}, err
	}
	defer t.close()
	c, srk := t.c, t.srk

	// The KEK's auth value travels in inSensitive: encrypt it with a one-shot
	// session salted to the SRK.
	sess := tpm2.HMAC(tpm2.TPMAlgSHA256, nonceSize,
		tpm2.Salted(srk.Handle, srk.pub), tpm2.AESEncryption(128, tpm2.EncryptIn))
	cr, err := tpm2.Create{
		ParentHandle: tpm2.AuthHandle{Handle: srk.Handle, Name: srk.Name, Auth: sess},
		InSensitive: tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{
			UserAuth: tpm2.TPM2BAuth{Buffer: auth},
		}},
		InPublic: tpm2.New2B(kekTemplate(cfg.Kind)),
	}.Execute(c)
	if err != nil {
		return KeyInfo{}, fmt.Errorf("tpm: create: TPM2_Create: %w", err)
	}
	pub, err := cr.OutPublic.Contents()
	if err != nil {
		return KeyInfo{}, fmt.Errorf("tpm: create: %w", err)
	}
	if err := checkKEKKind(pub, cfg.Kind); err != nil {
		return KeyInfo{}, fmt.Errorf("tpm: create: TPM returned an unexpected key: %w", err)
	}
	name, err := wire.ObjectName(pub)
	if err != nil {
		return KeyInfo{}, fmt.Errorf("tpm: create: %w", err)
	}
	info := KeyInfo{KeyID: wire.KeyID(name), Name: name, FixedTPM: pub.ObjectAttributes.FixedTPM}

	if err := t.store(cfg, "create", cr.OutPublic.Bytes(), cr.OutPrivate.Buffer, name, false, &info); err != nil {
		return KeyInfo{}, err
	}
	return info, nil
}

// keyTarget is where CreateKey and ImportKey put a new KEK: a one-shot connection
// with the checked owner SRK loaded, and the persistent handle (0 for the blob form),
// which, like the blob file, was checked to be free.
type keyTarget struct {
	c      *conn
	srk    primaryObject
	handle tpm2.TPMHandle
}

// openKeyTarget checks that cfg's blob file or persistent handle is free (else
// kek.ErrKeyExists: nothing is ever overwritten), connects to dev and creates the
// owner SRK, checked (checkSRK) against cfg.SRKName. op ("create", "import") names the
// command in errors. The caller calls close.
func openKeyTarget(ctx context.Context, cfg Config, dev device, op string) (*keyTarget, error) {
	t := &keyTarget{}
	if cfg.PersistentHandle != "" {
		t.handle, _ = parseHandle(cfg.PersistentHandle)
	} else if _, err := os.Lstat(cfg.BlobFile); err == nil {
		return nil, fmt.Errorf("tpm: %s: blobFile %s: %w", op, cfg.BlobFile, kek.ErrKeyExists)
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("tpm: %s: blobFile: %w", op, err)
	}
	c, err := openAdmin(ctx, dev)
	if err != nil {
		return nil, err
	}
	if t.handle != 0 {
		_, err := tpm2.ReadPublic{ObjectHandle: t.handle}.Execute(c)
		if err == nil {
			c.Close()
			return nil, fmt.Errorf("tpm: %s: handle %s: %w", op, cfg.PersistentHandle, kek.ErrKeyExists)
		}
		if !errors.Is(err, tpm2.TPMRCHandle) {
			c.Close()
			return nil, fmt.Errorf("tpm: %s: TPM2_ReadPublic: %w", op, err)
		}
	}
	t.srk, err = createSRK(c, cfg.pins().srk)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("tpm: %s: %w", op, err)
	}
	t.c = c
	return t, nil
}

// close flushes the SRK and closes the connection.
func (t *keyTarget) close() {
	flushHandle(t.c, t.srk.Handle)
	t.c.Close()
}

// store keeps the new KEK (public area pub, private priv, Name name): it makes it
// persistent at t.handle (TPM2_EvictControl), or writes cfg.BlobFile; with loadFirst a
// blob-form key is loaded once first, so a file is only written for a key that
// loads. It sets info.Handle or info.BlobFile.
func (t *keyTarget) store(cfg Config, op string, pub, priv, name []byte, loadFirst bool, info *KeyInfo) error {
	if t.handle != 0 {
		h, err := loadUnderSRKWith(t.c, t.srk, pub, priv, name)
		if err != nil {
			return fmt.Errorf("tpm: %s: %w", op, err)
		}
		defer flushHandle(t.c, h)
		_, err = tpm2.EvictControl{
			Auth:             tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			ObjectHandle:     tpm2.NamedHandle{Handle: h, Name: tpm2.TPM2BName{Buffer: name}},
			PersistentHandle: t.handle,
		}.Execute(t.c)
		if errors.Is(err, tpm2.TPMRCNVDefined) {
			return fmt.Errorf("tpm: %s: handle %s: %w: %w", op, cfg.PersistentHandle, kek.ErrKeyExists, err)
		}
		if err != nil {
			return fmt.Errorf("tpm: %s: TPM2_EvictControl: %w", op, err)
		}
		info.Handle = fmt.Sprintf("0x%08x", uint32(t.handle))
		return nil
	}
	if loadFirst {
		h, err := loadUnderSRKWith(t.c, t.srk, pub, priv, name)
		if err != nil {
			return fmt.Errorf("tpm: %s: %w", op, err)
		}
		if err := flushHandle(t.c, h); err != nil {
			return fmt.Errorf("tpm: %s: %w", op, err)
		}
	}
	blob, err := encodeObject(blobV1, pub, priv)
	if err != nil {
		return fmt.Errorf("tpm: %s: %w", op, err)
	}
	if err := writeBlobFile(cfg.BlobFile, blob); err != nil {
		return fmt.Errorf("tpm: %s: blobFile %s: %w", op, cfg.BlobFile, err)
	}
	info.BlobFile = cfg.BlobFile
	return nil
}

// Probe reports whether the KEK in cfg exists and is usable: the persistent object
// exists and has the KEK's shape, or the blob file parses and loads under this TPM's
// SRK. It changes nothing on the TPM (a blob is flushed after loading). A missing
// key gives kek.ErrKeyNotFound; a KEK other than cfg.KeyID, ErrKeyIDMismatch; an
// SRK other than cfg.SRKName (blob form), ErrSRKMismatch.
func Probe(ctx context.Context, cfg Config) (KeyInfo, error) {
	if err := cfg.Validate("tpm"); err != nil {
		return KeyInfo{}, err
	}
	dev, _ := parseDevice(cfg.Device)
	var (
		pub            *tpm2.TPMTPublic
		pubBytes, priv []byte
		handle         tpm2.TPMHandle
		err            error
		info           KeyInfo
	)
	if cfg.PersistentHandle != "" {
		handle, _ = parseHandle(cfg.PersistentHandle)
		info.Handle = fmt.Sprintf("0x%08x", uint32(handle))
	} else {
		if pub, pubBytes, priv, err = readBlobFile(cfg.BlobFile); err != nil {
			return KeyInfo{}, err
		}
		info.BlobFile = cfg.BlobFile
	}
	c, err := openAdmin(ctx, dev)
	if err != nil {
		return KeyInfo{}, err
	}
	defer c.Close()
	pin := cfg.pins()
	if handle != 0 {
		if pub, info.Name, err = readKEKPublic(c, handle); err != nil {
			return KeyInfo{}, fmt.Errorf("tpm: probe: %w", err)
		}
		if err := checkKeyID(info.Name, pin.kek, "persistent handle "+info.Handle); err != nil {
			return KeyInfo{}, fmt.Errorf("tpm: probe: %w", err)
		}
	} else {
		if info.Name, err = wire.ObjectName(pub); err != nil {
			return KeyInfo{}, fmt.Errorf("tpm: probe: %w", err)
		}
		if err := checkKeyID(info.Name, pin.kek, "blob file "+cfg.BlobFile); err != nil {
			return KeyInfo{}, fmt.Errorf("tpm: probe: %w", err)
		}
		h, err := loadUnderSRK(c, pubBytes, priv, info.Name, pin.srk)
		if err != nil {
			return KeyInfo{}, fmt.Errorf("tpm: probe: %w", err)
		}
		if err := flushHandle(c, h); err != nil {
			return KeyInfo{}, fmt.Errorf("tpm: probe: %w", err)
		}
	}
	info.KeyID = wire.KeyID(info.Name)
	info.FixedTPM = pub.ObjectAttributes.FixedTPM
	return info, nil
}

// DestroyKey evicts the persistent KEK (TPM2_EvictControl) or removes the blob file,
// after checking that the object is an hwkms KEK (and cfg.KeyID, if set). What that
// ends depends on the copies left: removing a blob file removes one copy, and any
// other copy of the blob (a backup, a restored disk) still loads under this TPM's
// owner SRK until the owner hierarchy is cleared; an imported KEK (fixedTPM clear)
// also lives in every other TPM that imported it and in its escrow blob, if one
// was made. Only evicting a KEK made here at a persistent handle (fixedTPM, never
// written out) leaves no copy, so that data wrapped by it can never be unwrapped
// again. A missing key gives kek.ErrKeyNotFound.
func DestroyKey(ctx context.Context, cfg Config) error {
	if err := cfg.Validate("tpm"); err != nil {
		return err
	}
	pin := cfg.pins()
	if cfg.BlobFile != "" {
		pub, _, _, err := readBlobFile(cfg.BlobFile)
		if err != nil {
			return err
		}
		name, err := wire.ObjectName(pub)
		if err != nil {
			return fmt.Errorf("tpm: destroy: %w", err)
		}
		if err := checkKeyID(name, pin.kek, "blob file "+cfg.BlobFile); err != nil {
			return fmt.Errorf("tpm: destroy: %w", err)
		}
		if err := files.Remove(cfg.BlobFile); err != nil {
			return fmt.Errorf("tpm: destroy: %w", err)
		}
		return nil
	}
	dev, _ := parseDevice(cfg.Device)
	handle, _ := parseHandle(cfg.PersistentHandle)
	c, err := openAdmin(ctx, dev)
	if err != nil {
		return err
	}
	defer c.Close()
	_, name, err := readKEKPublic(c, handle)
	if err != nil {
		return fmt.Errorf("tpm: destroy: %w", err)
	}
	if err := checkKeyID(name, pin.kek, fmt.Sprintf("persistent handle 0x%08x", uint32(handle))); err != nil {
		return fmt.Errorf("tpm: destroy: %w", err)
	}
	_, err = tpm2.EvictControl{
		Auth:             tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		ObjectHandle:     tpm2.NamedHandle{Handle: handle, Name: tpm2.TPM2BName{Buffer: name}},
		PersistentHandle: handle,
	}.Execute(c)
	if err != nil {
		return fmt.Errorf("tpm: destroy: TPM2_EvictControl: %w", err)
	}
	return nil
}

// openAdmin connects for a one-shot key command. Unlike Open it does not flush other
// processes' handles: a serving hwkms may be using this TPM.
func openAdmin(ctx context.Context, dev device) (*conn, error) {
	c, err := dial(ctx, dev)
	if err != nil {
		return nil, fmt.Errorf("tpm: %s: %w", dev, err)
	}
	if err := startup(c); err != nil {
		c.Close()
		return nil, fmt.Errorf("tpm: %s: %w", dev, err)
	}
	return c, nil
}

// readKEKPublic reads a persistent object's public area (TPM2_ReadPublic, Part 3
// section 12.4), checks it has the KEK's shape and returns it with its Name,
// computed here and compared with the TPM's.
func readKEKPublic(c *conn, h tpm2.TPMHandle) (*tpm2.TPMTPublic, []byte, error) {
	rp, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(c)
	if errors.Is(err, tpm2.TPMRCHandle) {
		return nil, nil, fmt.Errorf("persistent handle 0x%08x: %w", uint32(h), kek.ErrKeyNotFound)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("TPM2_ReadPublic(0x%08x): %w", uint32(h), tpmCall(err))
	}
	pub, err := rp.OutPublic.Contents()
	if err != nil {
		return nil, nil, fmt.Errorf("TPM2_ReadPublic(0x%08x): %w: %w", uint32(h), errDesync, err)
	}
	if err := wire.CheckAnyKEKPublic(pub); err != nil {
		return nil, nil, fmt.Errorf("persistent handle 0x%08x: %w: %w", uint32(h), ErrNotKEK, err)
	}
	name, err := wire.ObjectName(pub)
	if err != nil {
		return nil, nil, err
	}
	if !bytes.Equal(name, rp.Name.Buffer) {
		return nil, nil, fmt.Errorf("TPM2_ReadPublic(0x%08x): Name does not match the public area: %w", uint32(h), errDesync)
	}
	return pub, name, nil
}

// primaryObject is a loaded primary key (the SRK, or the EK).
type primaryObject struct {
	tpm2.NamedHandle
	pub tpm2.TPMTPublic
}

// createSRK creates the owner SRK from the TCG ECC P-256 template and checks it
// (checkSRK: its Name, its template and, if pin is set, that its Name is pin). The
// caller flushes it.
func createSRK(c *conn, pin []byte) (primaryObject, error) {
	srk, err := createPrimary(c, tpm2.TPMRHOwner, wire.SRKTemplate, "owner SRK")
	if err != nil {
		return primaryObject{}, err
	}
	if err := checkSRK(srk, pin); err != nil {
		flushHandle(c, srk.Handle)
		return primaryObject{}, err
	}
	return srk, nil
}

// createPrimary creates a primary key from tmpl under hierarchy (whose auth value
// must be empty); what names it in errors. The caller flushes it.
func createPrimary(c *conn, hierarchy tpm2.TPMHandle, tmpl tpm2.TPMTPublic, what string) (primaryObject, error) {
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: hierarchy, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(tmpl),
	}.Execute(c)
	if err != nil {
		return primaryObject{}, fmt.Errorf("TPM2_CreatePrimary(%s): %w", what, tpmCall(err))
	}
	pub, err := rsp.OutPublic.Contents()
	if err != nil {
		flushHandle(c, rsp.ObjectHandle)
		return primaryObject{}, fmt.Errorf("TPM2_CreatePrimary(%s): %w: %w", what, errDesync, err)
	}
	return primaryObject{NamedHandle: tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name}, pub: *pub}, nil
}

// loadUnderSRK creates the SRK (checked against srkPin, if set), loads a KEK blob
// under it, flushes the SRK and returns the KEK's transient handle. The loaded Name
// must equal name.
func loadUnderSRK(c *conn, pubBytes, priv, name, srkPin []byte) (tpm2.TPMHandle, error) {
	srk, err := createSRK(c, srkPin)
	if err != nil {
		return 0, err
	}
	defer flushHandle(c, srk.Handle)
	return loadUnderSRKWith(c, srk, pubBytes, priv, name)
}

func loadUnderSRKWith(c *conn, srk primaryObject, pubBytes, priv, name []byte) (tpm2.TPMHandle, error) {
	lr, err := tpm2.Load{
		ParentHandle: tpm2.AuthHandle{Handle: srk.Handle, Name: srk.Name, Auth: tpm2.PasswordAuth(nil)},
		InPrivate:    tpm2.TPM2BPrivate{Buffer: priv},
		InPublic:     tpm2.BytesAs2B[tpm2.TPMTPublic](pubBytes),
	}.Execute(c)
	if err != nil {
		err = tpmCall(err)
		if loadRejectsBody(err) {
			return 0, fmt.Errorf("KEK blob does not load under this TPM's owner SRK (another TPM, or owner hierarchy cleared): %w: %w", ErrNotKEK, err)
		}
		return 0, fmt.Errorf("TPM2_Load(KEK): %w", err)
	}
	if !bytes.Equal(lr.Name.Buffer, name) {
		flushHandle(c, lr.ObjectHandle)
		return 0, fmt.Errorf("TPM2_Load(KEK): unexpected Name: %w", errDesync)
	}
	return lr.ObjectHandle, nil
}
