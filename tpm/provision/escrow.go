package provision

import (
	"bytes"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/hmac"
	"crypto/rand"
	"crypto/subtle"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"

	"github.com/hwkms/hwkms/tpm/internal/wire"
)

// Offline escrow. The escrow key is an ECC P-256 key pair made off-line; its public
// half is written as an SRK public area (the TCG ECC P-256 SRK template with this
// point) so that the provisioning ceremony makes an ordinary import blob for it,
// exactly as for a node. Its private half lets RecoverKEKMaterial open that blob in
// software (the inverse of ImportBlob, Part 1 section 23.3.2.2) and give back the
// KEKMaterial, from which import blobs for new TPMs are made. The escrow private
// key is therefore as sensitive as the KEK: keep it off-line.

// NewEscrowKey generates an escrow key pair with crypto/rand and returns the
// private key as a PKCS#8 PEM block ("PRIVATE KEY") and the public key as an SRK
// public area (see EncodeSRKPEM) to pass to ImportBlob.
func NewEscrowKey() (privPEM []byte, pub SRKPublic, err error) {
	priv, err := ecdh.P256().GenerateKey(rand.Reader)
	if err != nil {
		return nil, SRKPublic{}, fmt.Errorf("tpm: escrow key: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, SRKPublic{}, fmt.Errorf("tpm: escrow key: %w", err)
	}
	defer clear(der)
	pub, err = escrowPublic(priv.PublicKey())
	if err != nil {
		return nil, SRKPublic{}, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), pub, nil
}

// escrowPublic is the SRK-shaped public area of an escrow key.
func escrowPublic(k *ecdh.PublicKey) (SRKPublic, error) {
	raw := k.Bytes()
	p := wire.SRKTemplate
	p.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: bytes.Clone(raw[1:33])},
		Y: tpm2.TPM2BECCParameter{Buffer: bytes.Clone(raw[33:65])},
	})
	name, err := wire.ObjectName(&p)
	if err != nil {
		return SRKPublic{}, fmt.Errorf("tpm: escrow key: %w", err)
	}
	return SRKPublic{Public: tpm2.Marshal(tpm2.New2B(p)), Name: name}, nil
}

// parseEscrowKey reads the PEM written by NewEscrowKey.
func parseEscrowKey(privPEM []byte) (*ecdh.PrivateKey, error) {
	blk, _ := pem.Decode(privPEM)
	if blk == nil || blk.Type != "PRIVATE KEY" {
		return nil, errors.New("tpm: escrow key: want a PEM \"PRIVATE KEY\" block")
	}
	defer clear(blk.Bytes)
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("tpm: escrow key: %w", err)
	}
	var priv *ecdh.PrivateKey
	switch k := k.(type) {
	case *ecdsa.PrivateKey:
		if priv, err = k.ECDH(); err != nil {
			return nil, fmt.Errorf("tpm: escrow key: %w", err)
		}
	case *ecdh.PrivateKey:
		priv = k
	default:
		return nil, fmt.Errorf("tpm: escrow key: %T is not an ECC key", k)
	}
	if priv.Curve() != ecdh.P256() {
		return nil, errors.New("tpm: escrow key: not a NIST P-256 key")
	}
	return priv, nil
}

// RecoverKEKMaterial opens an escrow blob (an import blob made for the escrow
// public key) with the escrow private key: ECDH with the blob's ephemeral point,
// KDFe(SHA-256, Z, "DUPLICATE", ephemeral X, escrow X) gives the seed, the HMAC
// keyed by KDFa(seed, "INTEGRITY") over the encrypted sensitive area and the KEK's
// Name is checked in constant time, and KDFa(seed, "STORAGE", Name) decrypts it
// (AES-128-CFB, zero IV). The private scalar must match the public point and the
// rebuilt public area must have the same Name, so the recovered KEK has the same
// key_id and storage seed: bodies wrapped before still unwrap on TPMs that import
// blobs made from it. The caller Destroys the result.
func RecoverKEKMaterial(escrowBlob, escrowPrivPEM []byte) (*KEKMaterial, error) {
	ib, err := ParseBlob(escrowBlob)
	if err != nil {
		return nil, fmt.Errorf("tpm: escrow blob: %w", err)
	}
	if ib.EK != nil {
		return nil, fmt.Errorf("tpm: escrow blob: %w: this blob is bound to a TPM's EK (a node's blob, not the escrow copy)", wire.ErrMalformed)
	}
	priv, err := parseEscrowKey(escrowPrivPEM)
	if err != nil {
		return nil, err
	}
	epub, err := escrowPublic(priv.PublicKey())
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(epub.Name, ib.ParentName) {
		return nil, ErrWrongEscrowKey
	}
	sens, err := openDuplicate(priv, ib)
	if err != nil {
		return nil, fmt.Errorf("tpm: escrow blob: %w", err)
	}
	defer clear(sens)
	return materialFromSensitive(ib, sens)
}

// openDuplicate undoes the outer wrapper of an import blob in software and
// returns the marshalled TPMT_SENSITIVE.
func openDuplicate(priv *ecdh.PrivateKey, ib *Blob) ([]byte, error) {
	pt, err := wire.SafeUnmarshal[tpm2.TPMSECCPoint](ib.Seed)
	if err == nil && !bytes.Equal(tpm2.Marshal(pt), ib.Seed) {
		err = wire.ErrMalformed
	}
	if err != nil {
		return nil, fmt.Errorf("%w: inSymSeed", wire.ErrMalformed)
	}
	const n = 32
	if len(pt.X.Buffer) > n || len(pt.Y.Buffer) > n {
		return nil, fmt.Errorf("%w: inSymSeed point", wire.ErrMalformed)
	}
	raw := make([]byte, 1+2*n)
	raw[0] = 4
	copy(raw[1+n-len(pt.X.Buffer):1+n], pt.X.Buffer)
	copy(raw[1+2*n-len(pt.Y.Buffer):], pt.Y.Buffer)
	eph, err := ecdh.P256().NewPublicKey(raw)
	if err != nil {
		return nil, fmt.Errorf("%w: inSymSeed point is not on P-256", wire.ErrMalformed)
	}
	z, err := priv.ECDH(eph)
	if err != nil {
		return nil, err
	}
	defer clear(z)
	ownX := priv.PublicKey().Bytes()[1 : 1+n]
	seed := tpm2.KDFe(crypto.SHA256, z, "DUPLICATE", pt.X.Buffer, ownX, 256)
	defer clear(seed)

	outerHMAC, dupSensitive, ok := wire.Cut2B(ib.Duplicate)
	if !ok || len(outerHMAC) != 32 || len(dupSensitive) < 2 {
		return nil, fmt.Errorf("%w: duplicate", wire.ErrMalformed)
	}
	mac := hmac.New(crypto.SHA256.New, tpm2.KDFa(crypto.SHA256, seed, "INTEGRITY", nil, nil, 256))
	mac.Write(dupSensitive)
	mac.Write(ib.Name)
	if subtle.ConstantTimeCompare(mac.Sum(nil), outerHMAC) != 1 {
		return nil, errors.New("integrity check failed (tampered, or not made for this key)")
	}
	key := tpm2.KDFa(crypto.SHA256, seed, "STORAGE", ib.Name, nil, 128)
	defer clear(key)
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	plain := make([]byte, len(dupSensitive))
	cipher.NewCFBDecrypter(block, make([]byte, aes.BlockSize)).XORKeyStream(plain, dupSensitive)
	sens, rest, ok := wire.Cut2B(plain)
	if !ok || len(rest) != 0 {
		clear(plain)
		return nil, fmt.Errorf("%w: sensitive area", wire.ErrMalformed)
	}
	return sens, nil
}

// materialFromSensitive checks a decrypted TPMT_SENSITIVE against the blob's
// public area and rebuilds the KEKMaterial.
func materialFromSensitive(ib *Blob, sensBytes []byte) (*KEKMaterial, error) {
	s, err := wire.SafeUnmarshal[tpm2.TPMTSensitive](sensBytes)
	if err != nil || !bytes.Equal(tpm2.Marshal(s), sensBytes) {
		return nil, fmt.Errorf("tpm: escrow blob: %w: sensitive area", wire.ErrMalformed)
	}
	d, err := s.Sensitive.ECC()
	if s.SensitiveType != tpm2.TPMAlgECC || err != nil || len(d.Buffer) == 0 || len(d.Buffer) > 32 {
		return nil, errors.New("tpm: escrow blob: sensitive area is not an ECC P-256 key")
	}
	if len(s.SeedValue.Buffer) != 32 {
		return nil, errors.New("tpm: escrow blob: storage seed is not 32 bytes")
	}
	scalar := make([]byte, 32)
	defer clear(scalar)
	copy(scalar[32-len(d.Buffer):], d.Buffer)
	k, err := ecdh.P256().NewPrivateKey(scalar)
	if err != nil {
		return nil, errors.New("tpm: escrow blob: invalid private scalar")
	}
	m, err := newKEKMaterial(k.PublicKey(), scalar, s.SeedValue.Buffer, s.AuthValue.Buffer)
	clear(d.Buffer)
	clear(s.SeedValue.Buffer)
	clear(s.AuthValue.Buffer)
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(m.name, ib.Name) {
		m.Destroy()
		return nil, errors.New("tpm: escrow blob: private key does not match the KEK's public area")
	}
	return m, nil
}
