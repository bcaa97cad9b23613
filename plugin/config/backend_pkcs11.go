package config

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/miekg/pkcs11"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin"
	"github.com/hwkms/hwkms/plugin/kek"
)

func init() {
	register(backendType{
		kind: kek.BackendPKCS11,
		of: func(k Key) Backend {
			if k.PKCS11 == nil {
				return nil
			}
			return pkcs11Key{k.PKCS11.Resolved()}
		},
		validate: func(k Key, prefix string) error { return k.PKCS11.Validate(prefix) },
		reason: func(err error) string {
			if name := hsm.Reason(err); strings.HasPrefix(name, "CKR_") {
				return name
			}
			return ""
		},
		stats: func(k kek.KEK, s *Stats) {
			if p, ok := k.(interface{ Stats() hsm.PoolStats }); ok {
				st := p.Stats()
				s.HasSessions, s.Sessions, s.SessionsInUse = true, st.Size, st.InUse
			}
			if r, ok := k.(interface{ Reinits() (ok, failed uint64) }); ok {
				s.HasReinits = true
				s.ReinitsOK, s.ReinitsFailed = r.Reinits()
			}
			if m, ok := k.(interface{ Mechanism() string }); ok {
				s.Mechanism = boundedMechanism(m.Mechanism())
			}
		},
	})
}

// pkcs11Key is a key in a PKCS#11 token (package hsm).
type pkcs11Key struct{ c hsm.Config }

var _ Backend = pkcs11Key{}

func (p pkcs11Key) Name() string { return kek.BackendPKCS11.String() }

func (p pkcs11Key) Open(ctx context.Context) (kek.KEK, error) {
	k, err := hsm.Open(ctx, p.c)
	if err != nil {
		return nil, err
	}
	return k, nil
}

func (p pkcs11Key) Create(ctx context.Context) (Created, error) {
	info, err := hsm.CreateKey(ctx, p.c)
	if err != nil {
		return Created{}, p.createAdvice(err)
	}
	c := p.created(info)
	mech := info.Mechanism
	if mech == "" {
		// An AES key alone: the token decides between aes-gcm and aes-gcm-token-iv.
		if mech, err = p.mechanismOf(ctx, info); err != nil {
			return Created{}, fmt.Errorf("the key was created (key_id %s) but does not open: %w", info.KeyID, err)
		}
	}
	c.Where += ", mechanism " + mech
	return c, nil
}

// createAdvice adds to a CreateKey error the step that makes the key another way when
// the token cannot generate keys through PKCS#11 (C_GenerateKey answered
// CKR_FUNCTION_NOT_SUPPORTED: tpm2-pkcs11, whose C_GenerateKey is a stub). Other
// errors are returned as they are.
func (p pkcs11Key) createAdvice(err error) error {
	var rv pkcs11.Error
	if !errors.As(err, &rv) || rv != pkcs11.CKR_FUNCTION_NOT_SUPPORTED {
		return err
	}
	return fmt.Errorf("%w\n%s", err, GenerateAdvice(p.c))
}

// GenerateAdvice says how to make, outside hwkms, a key hwkms accepts as the key c
// selects, for a token whose C_GenerateKey is not implemented. For tpm2-pkcs11 it is
// the exact tpm2_ptool commands (with a fresh random CKA_ID): an AES-256 key and an
// HMAC-SHA256 key with the same label and CKA_ID (aes-cbc-hmac: tpm2-pkcs11 has no
// CKM_AES_GCM), with the TCTI (TPM2TOOLS_TCTI) and store (--path) of this process's
// TPM2_PKCS11_TCTI and TPM2_PKCS11_STORE when set. The PIN is read from c's pinFile
// by the shell, never printed.
func GenerateAdvice(c hsm.Config) string {
	token := c.TokenLabel
	if token == "" {
		token = "TOKEN-LABEL"
	}
	label := c.KeyLabel
	if label == "" {
		label = "KEY-LABEL"
	}
	pin := `"$(cat PIN-FILE)"`
	if c.PINFile != "" {
		pin = `"$(cat ` + shellQuote(c.PINFile) + `)"`
	} else if c.PINEnv != "" {
		pin = `"$` + c.PINEnv + `"`
	}
	if strings.Contains(filepath.Base(c.Module), "tpm2_pkcs11") {
		id := make([]byte, 16)
		_, _ = rand.Read(id)
		// tpm2_ptool runs the tpm2 tools, which read their TCTI from TPM2TOOLS_TCTI,
		// not from the module's TPM2_PKCS11_TCTI; its store is --path or
		// TPM2_PKCS11_STORE, as for the module.
		var prefix, path string
		if tcti := os.Getenv("TPM2_PKCS11_TCTI"); tcti != "" {
			prefix = "TPM2TOOLS_TCTI=" + shellQuote(tcti) + " "
		}
		if store := os.Getenv("TPM2_PKCS11_STORE"); store != "" {
			path = " --path " + shellQuote(store)
		}
		cmd := func(alg string) string {
			return fmt.Sprintf("  %stpm2_ptool addkey --label %s --key-label %s --id %s --algorithm %s --userpin %s%s",
				prefix, shellQuote(token), shellQuote(label), hex.EncodeToString(id), alg, pin, path)
		}
		return "this token cannot generate keys through PKCS#11 (tpm2-pkcs11 has no C_GenerateKey); make the key with tpm2_ptool instead " +
			"(TPM2TOOLS_TCTI and --path as the environment of this command has them), then run hwkms key list:\n" +
			cmd("aes256") + "\n" + cmd("hmac:sha256") + "\n" +
			"(both with the same --id: hwkms uses the pair as one aes-cbc-hmac key; docs/tokens.md)"
	}
	return fmt.Sprintf("this token cannot generate keys through PKCS#11; make them with the token vendor's tool: an AES-256 secret key labelled %q "+
		"(CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE true, CKA_EXTRACTABLE false, a random CKA_ID) and, for a token without CKM_AES_GCM, an HMAC key "+
		"(CKK_GENERIC_SECRET or CKK_SHA256_HMAC, CKA_SIGN true) with the same label and CKA_ID; then run hwkms key list (docs/tokens.md)", label)
}

// shellQuote quotes s for a POSIX shell when it needs it.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./:=@") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// boundedMechanism returns name if it is one of hsm's mechanism names, else "other"
// (a metric label takes only known values).
func boundedMechanism(name string) string {
	switch name {
	case "", hsm.MechanismAESGCM, hsm.MechanismAESGCMTokenIV, hsm.MechanismAESCBCHMAC, hsm.MechanismRSAOAEP:
		return name
	}
	return "other"
}

// mechanismOf opens the key info names, as serve would, and returns the mechanism
// hsm.Open chose for it on this token (its objects and the token decide: an AES key
// alone gets aes-gcm or aes-gcm-token-iv, a key with an HMAC partner key on a token
// without a usable GCM aes-cbc-hmac). It returns the open error (wrapping
// hsm.ErrNoMechanism when the token lacks every candidate) if Open fails.
func (p pkcs11Key) mechanismOf(ctx context.Context, info hsm.KeyInfo) (string, error) {
	c := p.c
	c.KeyLabel, c.KeyCKAID = info.Label, info.CKAID
	k, err := hsm.Open(ctx, c)
	if err != nil {
		return "", err
	}
	defer k.Close()
	return k.Mechanism(), nil
}

// created describes the new key info, selected by label and CKA_ID.
func (p pkcs11Key) created(info hsm.KeyInfo) Created {
	c := p.c
	c.KeyLabel, c.KeyCKAID = info.Label, info.CKAID
	return Created{
		KeyID: info.KeyID,
		Where: fmt.Sprintf("on pkcs11 token: label %q CKA_ID %s", info.Label, info.CKAID),
		Key:   Key{PKCS11: &c},
	}
}

// matches reports whether info is selected by the configured label and CKA_ID.
func (p pkcs11Key) matches(info hsm.KeyInfo) bool {
	return info.Label == p.c.KeyLabel && (p.c.KeyCKAID == "" || info.CKAID == p.c.KeyCKAID)
}

func (p pkcs11Key) Describe(ctx context.Context) Description {
	keys, err := hsm.ListKeys(ctx, p.c)
	if err != nil {
		return Description{KeyID: "-", Detail: err.Error(), Err: err}
	}
	var match []hsm.KeyInfo
	for _, info := range keys {
		if p.matches(info) {
			match = append(match, info)
		}
	}
	switch len(match) {
	case 0:
		return Description{KeyID: "-", Detail: fmt.Sprintf("no key labelled %q", p.c.KeyLabel)}
	case 1:
		d := p.describe(match[0])
		if !match[0].Safe() && !p.c.AllowExtractable {
			return d
		}
		mech, err := p.mechanismOf(ctx, match[0])
		switch {
		case err != nil:
			d.Detail += "; mechanism: none: " + err.Error()
		default:
			d.Detail += "; mechanism " + mech
		}
		return d
	default:
		return Description{KeyID: "-", Detail: fmt.Sprintf("%d keys labelled %q; set keyCKAID", len(match), p.c.KeyLabel)}
	}
}

// describe describes the one key info the configuration selects.
func (p pkcs11Key) describe(info hsm.KeyInfo) Description {
	d := fmt.Sprintf("label %q CKA_ID %s", info.Label, info.CKAID)
	if !info.Safe() {
		d += " UNSAFE: extractable or not sensitive"
	}
	if w := info.AttributeWarning(); w != "" {
		d += " WARNING: " + w
	}
	return Description{
		KeyID:   info.KeyID,
		Present: true,
		Detail:  d,
		Where:   fmt.Sprintf("token %q label %q CKA_ID %s", p.c.TokenLabel+p.c.TokenSerial, info.Label, info.CKAID),
	}
}

func (p pkcs11Key) Is(ctx context.Context, keyID string) (bool, error) {
	keys, err := hsm.ListKeys(ctx, p.c)
	if err != nil {
		return false, err
	}
	for _, info := range keys {
		if p.matches(info) && info.KeyID == keyID {
			return true, nil
		}
	}
	return false, nil
}

func (p pkcs11Key) Rotate(ctx context.Context, o RotateOptions) (Created, error) {
	next := p
	next.c.KeyLabel, next.c.KeyCKAID = o.Label, ""
	if next.c.KeyLabel == "" {
		next.c.KeyLabel = "hwkms-kek-" + o.Stamp
	}
	info, err := hsm.CreateKey(ctx, next.c)
	if err != nil {
		return Created{}, fmt.Errorf("create key on the primary's token: %w", err)
	}
	// Pinned by CKA_ID too, in case the label is ever reused.
	return next.created(info), nil
}

func (p pkcs11Key) Destroy(ctx context.Context) error { return hsm.DestroyKey(ctx, p.c) }

// find searches the token for the key with key_id keyID.
func (p pkcs11Key) find(ctx context.Context, keyID string) (pkcs11Key, hsm.KeyInfo, bool, error) {
	keys, err := hsm.ListKeys(ctx, p.c)
	if err != nil {
		return pkcs11Key{}, hsm.KeyInfo{}, false, err
	}
	for _, info := range keys {
		if info.KeyID == keyID {
			found := p
			found.c.KeyLabel, found.c.KeyCKAID = info.Label, info.CKAID
			return found, info, true, nil
		}
	}
	return pkcs11Key{}, hsm.KeyInfo{}, false, nil
}

// FindKey searches the tokens the config's pkcs11 keys use for the key with key_id
// keyID (which need not be in the config) and returns a Key selecting exactly it, with
// its description.
func FindKey(ctx context.Context, cfg *Config, keyID string) (Key, Description, error) {
	for _, k := range cfg.Keys {
		p, isPKCS11 := k.resolved().(pkcs11Key)
		if !isPKCS11 {
			continue
		}
		found, info, ok, err := p.find(ctx, keyID)
		if err != nil {
			return Key{}, Description{}, err
		}
		if ok {
			return Key{PKCS11: &found.c}, found.describe(info), nil
		}
	}
	return Key{}, Description{}, fmt.Errorf("no key with key_id %s on the tokens this config uses", keyID)
}

// refusedPINsFile is where refused PINs are recorded, in StateDir (by default the
// socket's directory), kept across restarts of the process; a tmpfs StateDir forgets
// it at reboot.
const refusedPINsFile = "hwkms-refused-pins.json"

// RememberRefusedPINs makes a PIN a token refused stay refused across restarts
// (hsm.RememberRefusals), for configs with a pkcs11 key. With create (serve) the
// record's directory (StateDir, by default the socket's) is created at the first refusal; without it (the
// other commands) the record is used only where that directory already exists.
func (c *Config) RememberRefusedPINs(create bool) error {
	uses := false
	for _, k := range c.Keys {
		_, isPKCS11 := k.resolved().(pkcs11Key)
		uses = uses || isPKCS11
	}
	if !uses {
		return hsm.RememberRefusals("")
	}
	dir := c.stateDir()
	if !create {
		if _, err := os.Stat(dir); err != nil {
			return hsm.RememberRefusals("")
		}
	}
	if err := hsm.RememberRefusals(filepath.Join(dir, refusedPINsFile)); err != nil {
		return fmt.Errorf("open keys: %w", err)
	}
	return nil
}

// PINRefused reports whether err says a token refused its PIN: restarting with the
// same PIN would present it again and could lock the token.
func PINRefused(err error) bool {
	_, ok := errors.AsType[*hsm.PINError](err)
	return ok
}

func (p pkcs11Key) Check(ctx context.Context, r Checker, o CheckOptions) {
	c, name := p.c, o.Name
	field := fmt.Sprintf("keys[%d].pkcs11", o.Index)
	if _, err := os.Stat(c.Module); err != nil {
		r.Fail(name+" module loads", err.Error(), "install the token vendor's PKCS#11 library or correct "+field+".module")
		return
	}
	cctx, cancel := context.WithTimeout(ctx, o.Timeout)
	keys, err := hsm.ListKeys(cctx, c)
	cancel()
	var pinErr *hsm.PINError
	switch {
	case errors.Is(err, hsm.ErrPINSource):
		r.Fail(name+" PIN works", err.Error(), "make "+field+".pinFile readable by the hwkms user (mode 0600), or set "+field+".pinEnv")
		return
	case errors.Is(err, hsm.ErrModule):
		r.Fail(name+" module loads", err.Error(), "check that "+c.Module+" is a PKCS#11 module for this architecture and that its own config (e.g. SOFTHSM2_CONF) is readable")
		return
	}
	r.OK(name+" module loads", c.Module)
	switch {
	case errors.Is(err, hsm.ErrTokenNotFound):
		r.Fail(name+" token found", err.Error(), "check "+field+".tokenLabel/tokenSerial/slot against the token list of your HSM tool")
		return
	case err != nil && !errors.As(err, &pinErr):
		r.Fail(name+" token found", err.Error(), "check the token and the module's logs")
		return
	}
	r.OK(name+" token found", tokenDesc(c))
	if pinErr != nil {
		r.PINRefused()
		r.Fail(name+" PIN works", fmt.Sprintf("token %q refused the user PIN (%s)", pinErr.Token, hsm.Reason(pinErr)),
			"correct the PIN in "+field+".pinFile/pinEnv; do not retry blindly, repeated wrong PINs lock the token")
		return
	}
	r.OK(name+" PIN works", "logged in as CKU_USER")

	var match []hsm.KeyInfo
	for _, k := range keys {
		if k.Label == c.KeyLabel && (c.KeyCKAID == "" || strings.EqualFold(k.CKAID, c.KeyCKAID)) {
			match = append(match, k)
		}
	}
	switch {
	case len(match) == 0:
		r.Fail(name+" key present", fmt.Sprintf("no AES key labelled %q on the token", c.KeyLabel), fmt.Sprintf("hwkms key create --config %s --key %d", o.ConfigPath, o.Index))
		return
	case len(match) > 1:
		r.Fail(name+" key present", fmt.Sprintf("%d AES keys are labelled %q", len(match), c.KeyLabel), "set "+field+".keyCKAID to the CKA_ID of the one to use (hwkms key list)")
		return
	}
	ki := match[0]
	switch {
	case ki.Safe():
		r.OK(name+" key present", "key_id "+ki.KeyID+"; sensitive, never extractable"+partsDesc(ki))
	case c.AllowExtractable:
		r.Warn(name+" key present", "key_id "+ki.KeyID+" has unsafe attributes ("+unsafeDesc(ki)+"), accepted because allowExtractable is set",
			"create a new key with hwkms key create, rotate to it and remove allowExtractable")
	default:
		r.Fail(name+" key present", "key_id "+ki.KeyID+" has unsafe attributes: "+unsafeDesc(ki)+"; its value may exist outside the token",
			"create a new key with hwkms key create and rotate to it (docs/rotation.md)")
		return
	}
	if w := ki.AttributeWarning(); w != "" {
		r.Warn(name+" key attributes locked", "key_id "+ki.KeyID+": "+w,
			"create a new key with hwkms key create (which sets both false where the token allows) and rotate to it; or set them false with the token vendor's tool")
	}

	cctx, cancel = context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	k, err := hsm.Open(cctx, c)
	if errors.Is(err, hsm.ErrNoMechanism) {
		r.Fail(name+" mechanism", err.Error(), mechanismFix(c, field))
		return
	}
	if err != nil {
		r.Fail(name+" round trip", err.Error(), "")
		return
	}
	defer k.Close()
	r.OK(name+" mechanism", mechanismDetail(c, k.Mechanism()))
	roundTrip(cctx, r, name, k)
}

// mechanismDetail is doctor's line for the mechanism Open chose.
func mechanismDetail(c hsm.Config, mech string) string {
	how := "chosen by auto"
	if c.Mechanism != "" && c.Mechanism != hsm.MechanismAuto {
		how = "named in config"
	}
	d := mech + " (" + how + ")"
	if mech == hsm.MechanismAESGCMTokenIV && c.GCMMechanism != 0 {
		d += fmt.Sprintf(", gcmMechanism 0x%08x", c.GCMMechanism)
	}
	return d
}

// mechanismFix is doctor's fix for a token without a usable mechanism.
func mechanismFix(c hsm.Config, field string) string {
	if c.Mechanism != "" && c.Mechanism != hsm.MechanismAuto {
		return "remove " + field + ".mechanism (auto picks what the token has) or name one the token offers (docs/tokens.md)"
	}
	return "a token without CKM_AES_GCM needs an aes-cbc-hmac key (CKM_AES_CBC_PAD and CKM_SHA256_HMAC, an HMAC key with the AES key's label and CKA_ID: hwkms key create makes it); see docs/tokens.md"
}

func tokenDesc(c hsm.Config) string {
	switch {
	case c.TokenLabel != "":
		return fmt.Sprintf("label %q", c.TokenLabel)
	case c.TokenSerial != "":
		return fmt.Sprintf("serial %q", c.TokenSerial)
	case c.Slot != nil:
		return fmt.Sprintf("slot %d", *c.Slot)
	}
	return ""
}

func unsafeDesc(k hsm.KeyInfo) string {
	var s []string
	if k.Extractable {
		s = append(s, "CKA_EXTRACTABLE=true")
	}
	if !k.Sensitive {
		s = append(s, "CKA_SENSITIVE=false")
	}
	if !k.NeverExtractable {
		s = append(s, "CKA_NEVER_EXTRACTABLE=false")
	}
	if k.CKAID == "" {
		s = append(s, "no CKA_ID")
	}
	return strings.Join(s, ", ")
}

// partsDesc names the key objects beside the AES key, for doctor.
func partsDesc(k hsm.KeyInfo) string {
	switch k.Mechanism {
	case hsm.MechanismAESCBCHMAC:
		return "; with its HMAC key (aes-cbc-hmac)"
	case hsm.MechanismRSAOAEP:
		return "; an RSA key pair (rsa-oaep)"
	}
	return ""
}

// LogMechanisms logs one "key opened" line per key of ring that has a mechanism (the
// pkcs11 keys): index, key_id, backend and the mechanism chosen at open. serve calls
// it at start and the reloader after each reload.
func LogMechanisms(log *slog.Logger, ring *plugin.Keyring) {
	for i, k := range ring.Keys() {
		if mech := DeviceStats(k).Mechanism; mech != "" {
			log.Info("key opened", "index", i, "key_id", k.ID(), "backend", k.Backend().String(), "mechanism", mech)
		}
	}
}
