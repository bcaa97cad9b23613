package hsm

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/miekg/pkcs11"
)

// ErrNotStored means the token accepted a new key as a token object (C_GenerateKey
// with CKA_TOKEN true returned CKR_OK and CKA_TOKEN reads back true) but a lookup after
// the creating session was closed did not find it: the key would be gone for the next
// process. The opencryptoki soft token does this when its TOK_OBJ directory is missing
// (docs/tokens.md).
var ErrNotStored = errors.New("the token did not store the key")

// verifyStored looks for the key objects CreateKey just made (label and CKA_ID id,
// CKA_TOKEN true; want of them) again, after the creating session is gone, through
// acquireAdminToken as Open does. When CreateKey was the module's only user in the
// process (what `hwkms key create` runs) the module was finalised when the creating
// session's token reference was released, so this lookup follows a new C_Initialize
// and sees what the token stored, not what it kept in memory for the creating process.
// When other keys keep the module initialised it is a lookup from a new session only.
//
// If fewer than want objects are found, it destroys those that are (a half-made key
// must not be left for Open to find) and returns an error wrapping ErrNotStored and
// kek.ErrUnavailable.
func verifyStored(ctx context.Context, cfg Config, id []byte, want int) error {
	tmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, cfg.KeyLabel),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
	}
	return adminSession(ctx, cfg, true, func(t *token, sh pkcs11.SessionHandle) error {
		hs, err := findObjects(t.ctx, sh, tmpl)
		if err != nil {
			return fmt.Errorf("hsm: looking for the new key labelled %q (CKA_ID %s) again from a new session: %w", cfg.KeyLabel, hex.EncodeToString(id), err)
		}
		if len(hs) >= want {
			return nil
		}
		notStored := fmt.Errorf("hsm: the token accepted CKA_TOKEN but did not store the key: after the creating session closed, a new session on token %q finds %d of the %d object(s) labelled %q with CKA_ID %s, so the key would be gone for the next process (for opencryptoki: check that the token directory's TOK_OBJ, e.g. /var/lib/opencryptoki/swtok/TOK_OBJ, exists and is writable by the pkcs11 group): %w: %w",
			t.label, len(hs), want, cfg.KeyLabel, hex.EncodeToString(id), ErrNotStored, kek.ErrUnavailable)
		var errs []error
		for _, h := range hs {
			if err := t.ctx.DestroyObject(sh, h); err != nil {
				errs = append(errs, opError{op: "C_DestroyObject", err: err})
			}
		}
		if len(errs) > 0 {
			return errors.Join(notStored, fmt.Errorf("hsm: destroying what was stored of the new key failed; destroy it by hand: %w", errors.Join(errs...)))
		}
		return notStored
	})
}
