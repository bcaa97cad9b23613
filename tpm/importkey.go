package tpm

import (
	"bytes"
	"context"
	"crypto/ecdh"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"os"

	"github.com/google/go-tpm/tpm2"
	"github.com/hwkms/hwkms/plugin/kek"
)

// This file holds the multi-node ("imported KEK") form of the KEK: one KEK made
// outside any TPM in a provisioning ceremony and imported into every node's TPM
// with TPM2_Import (Part 3 section 13.3) from the duplication format of Part 1
// section 23.3. See doc.go, "Imported KEK", and docs/ha.md.

// ErrWrongTPM means an import blob was made for another TPM's SRK.
var ErrWrongTPM = errors.New("tpm: import blob was made for another TPM's SRK")

// noDuplicationPolicy is the authPolicy of every imported KEK: SHA-256 of a
// 32-byte string. A policy session's digest is only ever SHA-256 of at least 36
// bytes (the previous 32-byte digest or zeros, then a 4-byte command code, then
// the command's arguments), so reaching this value needs a SHA-256 second
// preimage: no policy session can satisfy it. TPM2_Duplicate authorises its
// object in the DUP role, which only a policy session can take (Part 1 section
// 19.7.3), so the imported KEK can never be duplicated again; userWithAuth lets
// its auth value authorise the USER role (Create, Load under it), and
// adminWithPolicy is clear so the ADMIN role also takes the auth value.
var noDuplicationPolicy = func() []byte {
	d := sha256.Sum256([]byte(noDuplicationLabel))
	return d[:]
}()

const noDuplicationLabel = "hwkms: no policy satisfies this\x00" // 32 bytes: shorter than any policy hash input

// kekImportedAttributes is the attribute set of an imported KEK. fixedTPM must be
// clear for any object made outside the TPM (TPM2_Import refuses it), and under a
// fixedTPM parent such as the SRK the TPM requires fixedParent == fixedTPM (Part 1
// section 27.2.3.4, PublicAttributesValidation), so fixedParent is clear too:
// non-duplicability comes from noDuplicationPolicy instead. sensitiveDataOrigin is
// clear because the TPM did not generate the key.
var kekImportedAttributes = tpm2.TPMAObject{
	FixedTPM:            false,
	FixedParent:         false,
	SensitiveDataOrigin: false,
	UserWithAuth:        true,
	AdminWithPolicy:     false,
	NoDA:                true,
	Restricted:          true,
	Decrypt:             true,
	SignEncrypt:         false,
}

// Sealed objects under an imported KEK: fixedTPM must be clear (a fixedTPM object
// needs a fixedTPM parent); fixedParent keeps them from being duplicated.
var (
	sealedImportedAttributes = tpm2.TPMAObject{
		FixedParent:  true,
		UserWithAuth: true,
		NoDA:         true,
	}
	sealedImportedPolicyAttributes = tpm2.TPMAObject{
		FixedParent:     true,
		AdminWithPolicy: true,
		NoDA:            true,
	}
)

// kekImportedTemplate is the public area of an imported KEK without its public
// point: kekTemplate with kekImportedAttributes and noDuplicationPolicy.
func kekImportedTemplate() tpm2.TPMTPublic {
	t := kekTemplate()
	t.ObjectAttributes = kekImportedAttributes
	t.AuthPolicy = tpm2.TPM2BDigest{Buffer: bytes.Clone(noDuplicationPolicy)}
	return t
}

// isImportedKEK reports whether pub has the imported KEK's attributes and policy
// (its other fields are checked by checkKEKPublic).
func isImportedKEK(pub *tpm2.TPMTPublic) bool {
	return sameAttrs(pub.ObjectAttributes, kekImportedAttributes) &&
		bytes.Equal(pub.AuthPolicy.Buffer, noDuplicationPolicy)
}

// sealedTemplateFor is sealedTemplate for a KEK of either form.
func sealedTemplateFor(authPolicy []byte, imported bool) tpm2.TPMTPublic {
	t := sealedTemplate(authPolicy)
	if imported {
		t.ObjectAttributes = sealedImportedAttributes
		if authPolicy != nil {
			t.ObjectAttributes = sealedImportedPolicyAttributes
		}
	}
	return t
}

// checkSealedPublicFor is checkSealedPublic for a KEK of either form: under an
// imported KEK, sealed objects have fixedTPM clear and nothing else differs.
func checkSealedPublicFor(pub *tpm2.TPMTPublic, imported bool) error {
	if !imported {
		return checkSealedPublic(pub)
	}
	cp := *pub
	switch {
	case sameAttrs(pub.ObjectAttributes, sealedImportedAttributes):
		cp.ObjectAttributes = sealedAttributes
	case sameAttrs(pub.ObjectAttributes, sealedImportedPolicyAttributes):
		cp.ObjectAttributes = sealedPolicyAttributes
	default:
		return errors.New("object attributes are not those of an hwkms sealed object under an imported KEK")
	}
	return checkSealedPublic(&cp)
}

// SRKPublic is a TPM's owner SRK as exported by ExportSRK.
type SRKPublic struct {
	// Public is the TPM2B_PUBLIC of the SRK, as TPM2_CreatePrimary returns it (the
	// "tss" format of tpm2-tools).
	Public []byte
	// Name is nameAlg || SHA-256(TPMT_PUBLIC), computed here.
	Name []byte
}

// ExportSRK re-creates the owner SRK of the TPM at device from the TCG ECC P-256
// template (TPM2_CreatePrimary, Part 3 section 24.1), returns its public area and
// Name, and flushes it. This is the public key that import blobs for this TPM are
// encrypted to. The owner hierarchy's auth value must be empty.
func ExportSRK(ctx context.Context, device string) (SRKPublic, error) {
	dev, err := parseDevice(device)
	if err != nil {
		return SRKPublic{}, fmt.Errorf("tpm: device: %w", err)
	}
	c, err := openAdmin(ctx, dev)
	if err != nil {
		return SRKPublic{}, err
	}
	defer c.Close()
	srk, err := createSRK(c)
	if err != nil {
		return SRKPublic{}, fmt.Errorf("tpm: export SRK: %w", err)
	}
	defer flushHandle(c, srk.Handle)
	name, err := objectName(&srk.pub)
	if err != nil {
		return SRKPublic{}, fmt.Errorf("tpm: export SRK: %w", err)
	}
	if !bytes.Equal(name, srk.Name.Buffer) {
		return SRKPublic{}, fmt.Errorf("tpm: export SRK: the TPM's Name does not match the public area: %w", errDesync)
	}
	return SRKPublic{Public: tpm2.Marshal(tpm2.New2B(srk.pub)), Name: name}, nil
}

// srkPEMType is the PEM block type of an exported SRK public area.
const srkPEMType = "TPM2B PUBLIC"

// EncodeSRKPEM returns the SRK public area as a PEM block "TPM2B PUBLIC" whose
// bytes are the TPM2B_PUBLIC.
func (s SRKPublic) EncodeSRKPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: srkPEMType, Bytes: s.Public})
}

// ParseSRKPublic parses an SRK public area, either a raw TPM2B_PUBLIC (tpm2-tools
// "tss" format) or the PEM block EncodeSRKPEM writes, and checks that it is a
// storage key an import blob can be made for: ECC NIST P-256, nameAlg SHA-256,
// restricted|decrypt, AES-128-CFB, with a point on the curve.
func ParseSRKPublic(b []byte) (SRKPublic, *tpm2.TPMTPublic, error) {
	if blk, _ := pem.Decode(b); blk != nil {
		if blk.Type != srkPEMType {
			return SRKPublic{}, nil, fmt.Errorf("tpm: SRK public: PEM block %q, want %q", blk.Type, srkPEMType)
		}
		b = blk.Bytes
	}
	body, rest, ok := cut2B(b)
	if !ok || len(rest) != 0 || len(body) == 0 {
		return SRKPublic{}, nil, errors.New("tpm: SRK public: not a TPM2B_PUBLIC")
	}
	pub, err := safeUnmarshalPublic(body)
	if err != nil {
		return SRKPublic{}, nil, fmt.Errorf("tpm: SRK public: %w", err)
	}
	if again, err := safeMarshal(pub); err != nil || !bytes.Equal(again, body) {
		return SRKPublic{}, nil, errors.New("tpm: SRK public: public area is not canonical")
	}
	if err := checkStorageParent(pub); err != nil {
		return SRKPublic{}, nil, fmt.Errorf("tpm: SRK public: %w", err)
	}
	name, err := objectName(pub)
	if err != nil {
		return SRKPublic{}, nil, fmt.Errorf("tpm: SRK public: %w", err)
	}
	return SRKPublic{Public: bytes.Clone(b), Name: name}, pub, nil
}

// checkStorageParent accepts the public area of an ECC P-256 storage key with the
// symmetric parameters of the TCG SRK template.
func checkStorageParent(pub *tpm2.TPMTPublic) error {
	if pub.Type != tpm2.TPMAlgECC || pub.NameAlg != tpm2.TPMAlgSHA256 {
		return errors.New("not an ECC key with nameAlg SHA-256")
	}
	a := pub.ObjectAttributes
	if !a.Restricted || !a.Decrypt || a.SignEncrypt {
		return errors.New("not a storage key (restricted decrypt)")
	}
	ecc, err := pub.Parameters.ECCDetail()
	if err != nil {
		return err
	}
	want, _ := srkTemplate.Parameters.ECCDetail()
	if !bytes.Equal(tpm2.Marshal(ecc), tpm2.Marshal(want)) {
		return errors.New("parameters are not ECC P-256 with AES-128-CFB")
	}
	pt, err := pub.Unique.ECC()
	if err != nil {
		return err
	}
	if _, err := tpm2.ECDHPub(ecc, pt); err != nil {
		return fmt.Errorf("public point: %w", err)
	}
	return nil
}

// KEKMaterial is an imported-form KEK in memory: its public area and its
// TPMT_SENSITIVE (private scalar, storage seed, auth value). It exists only during
// a provisioning or recovery ceremony; call Destroy when done. Not safe for
// concurrent use.
type KEKMaterial struct {
	pub       tpm2.TPMTPublic
	name      []byte
	sensitive []byte // marshalled TPMT_SENSITIVE; cleared by Destroy
}

// NewKEKMaterial generates an imported-form KEK with crypto/rand: an ECC P-256
// private scalar, a 32-byte storage seed (the key from which the TPM derives the
// protection of every sealed object under the KEK, Part 1 section 23.4), and the
// given auth value (nil, or MinAuthLen..MaxAuthLen bytes without NUL). The public
// area is kekImportedTemplate with the public point.
func NewKEKMaterial(auth []byte) (*KEKMaterial, error) {
	if len(auth) != 0 && (len(auth) < MinAuthLen || len(auth) > MaxAuthLen || bytes.IndexByte(auth, 0) >= 0) {
		return nil, fmt.Errorf("tpm: KEK auth value must be %d to %d bytes without NUL", MinAuthLen, MaxAuthLen)
	}
	priv, err := ecdh.P256().GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("tpm: generate KEK: %w", err)
	}
	seed := make([]byte, sha256.Size)
	if _, err := rand.Read(seed); err != nil {
		return nil, fmt.Errorf("tpm: generate KEK: %w", err)
	}
	d := priv.Bytes()
	defer clear(d)
	defer clear(seed)
	return newKEKMaterial(priv.PublicKey(), d, seed, auth)
}

func newKEKMaterial(pubKey *ecdh.PublicKey, d, seed, auth []byte) (*KEKMaterial, error) {
	raw := pubKey.Bytes() // 0x04 || X || Y
	pub := kekImportedTemplate()
	pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: bytes.Clone(raw[1:33])},
		Y: tpm2.TPM2BECCParameter{Buffer: bytes.Clone(raw[33:65])},
	})
	name, err := objectName(&pub)
	if err != nil {
		return nil, fmt.Errorf("tpm: KEK Name: %w", err)
	}
	sens := tpm2.Marshal(tpm2.TPMTSensitive{
		SensitiveType: tpm2.TPMAlgECC,
		AuthValue:     tpm2.TPM2BAuth{Buffer: auth},
		SeedValue:     tpm2.TPM2BDigest{Buffer: seed},
		Sensitive:     tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgECC, &tpm2.TPM2BECCParameter{Buffer: d}),
	})
	return &KEKMaterial{pub: pub, name: name, sensitive: sens}, nil
}

// KeyID is the key_id every node that imports this KEK reports.
func (m *KEKMaterial) KeyID() string { return keyID(m.name) }

// Name is the KEK's TPM Name.
func (m *KEKMaterial) Name() []byte { return bytes.Clone(m.name) }

// Destroy clears the private part. The KEKMaterial is unusable afterwards. Go's
// crypto/ecdh and go-tpm keep copies of the scalar that cannot be cleared; run the
// ceremony in a short-lived process.
func (m *KEKMaterial) Destroy() {
	clear(m.sensitive)
	m.sensitive = nil
}

// importMagic starts every import blob, followed by its format version.
var importMagic = []byte("HWKI")

const importV1 = 0x01

// ImportBlob encrypts the KEK to a TPM's SRK (parent, as ParseSRKPublic accepts it)
// in the duplication format of Part 1 section 23.3 with an outer wrapper only:
// a fresh symmetric seed is encapsulated to the SRK's public key (one-pass ECDH,
// KDFe label "DUPLICATE"), the TPM2B_SENSITIVE is AES-128-CFB encrypted with
// KDFa(seed, "STORAGE", Name) and integrity-protected with HMAC-SHA-256 keyed by
// KDFa(seed, "INTEGRITY") over the ciphertext and the KEK's Name (go-tpm's
// tpm2.CreateDuplicate). The returned blob is:
//
//	"HWKI" 0x01 | TPM2B_PUBLIC (KEK) | TPM2B_NAME (parent SRK) |
//	TPM2B_PRIVATE (duplicate) | TPM2B_ENCRYPTED_SECRET (inSymSeed)
//
// Only the TPM holding the SRK's private key can TPM2_Import it.
func (m *KEKMaterial) ImportBlob(parent []byte) ([]byte, error) {
	srkName, dup, seed, err := m.duplicateFor(parent)
	if err != nil {
		return nil, err
	}
	return encodeImportBlob(importV1, tpm2.Marshal(m.pub), srkName, dup, seed)
}

// duplicateFor encrypts the KEK to the SRK in parent (ParseSRKPublic's input) and
// returns the SRK's Name and the duplication-format fields (see ImportBlob).
func (m *KEKMaterial) duplicateFor(parent []byte) (srkName, dup, seed []byte, err error) {
	if m.sensitive == nil {
		return nil, nil, nil, errors.New("tpm: KEK material destroyed")
	}
	srk, srkPub, err := ParseSRKPublic(parent)
	if err != nil {
		return nil, nil, nil, err
	}
	ek, err := tpm2.ImportEncapsulationKey(srkPub)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("tpm: SRK public: %w", err)
	}
	dup, seed, err = tpm2.CreateDuplicate(rand.Reader, ek, m.name, m.sensitive)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("tpm: duplicate: %w", err)
	}
	return srk.Name, dup, seed, nil
}

// encodeImportBlob writes "HWKI", version and each field as a u16-length-prefixed
// TPM2B.
func encodeImportBlob(version byte, fields ...[]byte) ([]byte, error) {
	out := append(bytes.Clone(importMagic), version)
	var err error
	for _, f := range fields {
		if out, err = append2B(out, f); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// append2B appends f to out as a TPM2B: a big-endian u16 length, then f (1..65535
// bytes).
func append2B(out, f []byte) ([]byte, error) {
	if len(f) == 0 || len(f) > 0xffff {
		return nil, errors.New("tpm: import blob field out of range")
	}
	out = binary.BigEndian.AppendUint16(out, uint16(len(f)))
	return append(out, f...), nil
}

// importBlob is a parsed import blob.
type importBlob struct {
	pub        *tpm2.TPMTPublic
	pubBytes   []byte // TPMT_PUBLIC
	name       []byte // the KEK's Name, computed
	parentName []byte
	duplicate  []byte // nil in an EK-bound blob until activated
	seed       []byte
	ek         *ekBinding // set for an EK-bound (version 2) blob
}

// parseImportBlob parses an import blob (version 1, or version 2 bound to an EK)
// strictly and checks that the KEK's public area has the imported KEK's exact shape.
func parseImportBlob(b []byte) (*importBlob, error) {
	if !bytes.HasPrefix(b, importMagic) || len(b) < len(importMagic)+1 {
		return nil, fmt.Errorf("%w: not an hwkms import blob", errMalformed)
	}
	var fields int
	switch v := b[len(importMagic)]; v {
	case importV1:
		fields = 4
	case importV2:
		fields = 6
	default:
		return nil, fmt.Errorf("%w: import blob version %d, want %d or %d", errMalformed, v, importV1, importV2)
	}
	rest := b[len(importMagic)+1:]
	f := make([][]byte, fields)
	for i := range f {
		var ok bool
		if f[i], rest, ok = cut2B(rest); !ok || len(f[i]) == 0 {
			return nil, fmt.Errorf("%w: import blob truncated", errMalformed)
		}
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%w: import blob has %d trailing bytes", errMalformed, len(rest))
	}
	pub, err := safeUnmarshalPublic(f[0])
	if err != nil {
		return nil, fmt.Errorf("%w: KEK public area: %w", errMalformed, err)
	}
	if again, err := safeMarshal(pub); err != nil || !bytes.Equal(again, f[0]) {
		return nil, fmt.Errorf("%w: KEK public area is not canonical", errMalformed)
	}
	if err := checkKEKPublic(pub); err != nil || !isImportedKEK(pub) {
		return nil, fmt.Errorf("%w: the public area is not an hwkms imported KEK", ErrNotKEK)
	}
	name, err := objectName(pub)
	if err != nil {
		return nil, err
	}
	ib := &importBlob{pub: pub, pubBytes: f[0], name: name, parentName: f[1]}
	if fields == 4 {
		ib.duplicate, ib.seed = f[2], f[3]
		return ib, nil
	}
	aad := b[:len(b)-2-len(f[5])]
	if ib.ek, err = parseEKBinding(f[2:], aad); err != nil {
		return nil, err
	}
	return ib, nil
}

// ImportBlobInfo describes an import blob without a TPM.
type ImportBlobInfo struct {
	KeyID      string // the key_id of the KEK inside
	ParentName []byte // Name of the SRK it was made for
	EKName     []byte // Name of the EK it is bound to; nil for a version 1 blob
}

// InspectImportBlob parses an import blob and reports what it holds.
func InspectImportBlob(b []byte) (ImportBlobInfo, error) {
	ib, err := parseImportBlob(b)
	if err != nil {
		return ImportBlobInfo{}, fmt.Errorf("tpm: import blob: %w", err)
	}
	info := ImportBlobInfo{KeyID: keyID(ib.name), ParentName: bytes.Clone(ib.parentName)}
	if ib.ek != nil {
		info.EKName = bytes.Clone(ib.ek.name)
	}
	return info, nil
}

// ImportKey imports the KEK in an import blob into the TPM in cfg: it re-creates
// the owner SRK, checks that the blob was made for it (else ErrWrongTPM), runs
// TPM2_Import under it (Part 3 section 13.3; the TPM decrypts the seed with the
// SRK's private key and checks the integrity HMAC), and then, like CreateKey,
// writes cfg.BlobFile (version 0x01 || TPM2B_PUBLIC || TPM2B_PRIVATE, the format
// Open reads) or makes the key persistent at cfg.PersistentHandle. It never
// overwrites (kek.ErrKeyExists). cfg.AuthFile is not read: the auth value is inside the
// blob, and Open checks the configured one.
func ImportKey(ctx context.Context, cfg Config, blob []byte) (KeyInfo, error) {
	if err := cfg.Validate("tpm"); err != nil {
		return KeyInfo{}, err
	}
	ib, err := parseImportBlob(blob)
	if err != nil {
		return KeyInfo{}, fmt.Errorf("tpm: import: %w", err)
	}
	dev, _ := parseDevice(cfg.Device)
	var handle tpm2.TPMHandle
	if cfg.PersistentHandle != "" {
		handle, _ = parseHandle(cfg.PersistentHandle)
	} else if _, err := os.Lstat(cfg.BlobFile); err == nil {
		return KeyInfo{}, fmt.Errorf("tpm: import: blobFile %s: %w", cfg.BlobFile, kek.ErrKeyExists)
	} else if !errors.Is(err, os.ErrNotExist) {
		return KeyInfo{}, fmt.Errorf("tpm: import: blobFile: %w", err)
	}
	c, err := openAdmin(ctx, dev)
	if err != nil {
		return KeyInfo{}, err
	}
	defer c.Close()
	if handle != 0 {
		_, err := tpm2.ReadPublic{ObjectHandle: handle}.Execute(c)
		if err == nil {
			return KeyInfo{}, fmt.Errorf("tpm: import: handle %s: %w", cfg.PersistentHandle, kek.ErrKeyExists)
		}
		if !errors.Is(err, tpm2.TPMRCHandle) {
			return KeyInfo{}, fmt.Errorf("tpm: import: TPM2_ReadPublic: %w", err)
		}
	}
	srk, err := createSRK(c)
	if err != nil {
		return KeyInfo{}, fmt.Errorf("tpm: import: %w", err)
	}
	defer flushHandle(c, srk.Handle)
	if !bytes.Equal(srk.Name.Buffer, ib.parentName) {
		return KeyInfo{}, fmt.Errorf("tpm: import: blob is for SRK %x, this TPM's SRK is %x: %w", ib.parentName, srk.Name.Buffer, ErrWrongTPM)
	}
	if ib.ek != nil {
		if ib.duplicate, ib.seed, err = activate(c, srk, ib.ek); err != nil {
			return KeyInfo{}, fmt.Errorf("tpm: import: %w", err)
		}
	}
	priv, err := importUnder(c, srk, ib)
	if err != nil {
		return KeyInfo{}, fmt.Errorf("tpm: import: %w", err)
	}
	info := KeyInfo{KeyID: keyID(ib.name), Name: ib.name}
	if handle != 0 {
		h, err := loadUnderSRKWith(c, srk, ib.pubBytes, priv, ib.name)
		if err != nil {
			return KeyInfo{}, fmt.Errorf("tpm: import: %w", err)
		}
		defer flushHandle(c, h)
		_, err = tpm2.EvictControl{
			Auth:             tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			ObjectHandle:     tpm2.NamedHandle{Handle: h, Name: tpm2.TPM2BName{Buffer: ib.name}},
			PersistentHandle: handle,
		}.Execute(c)
		if errors.Is(err, tpm2.TPMRCNVDefined) {
			return KeyInfo{}, fmt.Errorf("tpm: import: handle %s: %w: %w", cfg.PersistentHandle, kek.ErrKeyExists, err)
		}
		if err != nil {
			return KeyInfo{}, fmt.Errorf("tpm: import: TPM2_EvictControl: %w", err)
		}
		info.Handle = fmt.Sprintf("0x%08x", uint32(handle))
		return info, nil
	}
	// Load it once so a blob file is only written for a key that loads.
	h, err := loadUnderSRKWith(c, srk, ib.pubBytes, priv, ib.name)
	if err != nil {
		return KeyInfo{}, fmt.Errorf("tpm: import: %w", err)
	}
	if err := flushHandle(c, h); err != nil {
		return KeyInfo{}, fmt.Errorf("tpm: import: %w", err)
	}
	kb, err := encodeObject(blobV1, ib.pubBytes, priv)
	if err != nil {
		return KeyInfo{}, fmt.Errorf("tpm: import: %w", err)
	}
	if err := writeNewFile(cfg.BlobFile, kb); err != nil {
		return KeyInfo{}, fmt.Errorf("tpm: import: blobFile %s: %w", cfg.BlobFile, err)
	}
	info.BlobFile = cfg.BlobFile
	return info, nil
}

// importUnder runs TPM2_Import of ib under the loaded SRK and returns the new
// TPM2B_PRIVATE contents. The parameters are already encrypted (the seed to the
// SRK, the sensitive area under the seed), so a password session suffices.
func importUnder(c *conn, srk primaryObject, ib *importBlob) ([]byte, error) {
	rsp, err := tpm2.Import{
		ParentHandle: tpm2.AuthHandle{Handle: srk.Handle, Name: srk.Name, Auth: tpm2.PasswordAuth(nil)},
		ObjectPublic: tpm2.BytesAs2B[tpm2.TPMTPublic](ib.pubBytes),
		Duplicate:    tpm2.TPM2BPrivate{Buffer: ib.duplicate},
		InSymSeed:    tpm2.TPM2BEncryptedSecret{Buffer: ib.seed},
		Symmetric:    tpm2.TPMTSymDef{Algorithm: tpm2.TPMAlgNull},
	}.Execute(c)
	if err != nil {
		return nil, fmt.Errorf("TPM2_Import: %w", tpmCall(err))
	}
	return rsp.OutPrivate.Buffer, nil
}
