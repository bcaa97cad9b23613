package hsm

import (
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
)

// Config.URI is an RFC 7512 pkcs11: URI that names, instead of the separate fields,
//
//	token=LABEL | serial=SERIAL | slot-id=N   the token (exactly one): tokenLabel, tokenSerial, slot
//	object=LABEL                              keyLabel
//	id=%01%02...                              keyCKAID (the raw CKA_ID bytes, percent-encoded)
//	type=secret-key                           optional; no other type is accepted
//	?module-path=/abs/lib.so                  module
//	?module-name=NAME                         module, found in moduleDirs (or in module-path, a directory)
//	?pin-source=file:/abs/path                pinFile
//
// for example pkcs11:token=k8s-kms;object=kek-2026;id=%01%02?module-path=/usr/lib/x.so&pin-source=file:/etc/hwkms/pin.
// pin-value is refused (PINs come only from a file or an environment variable; pinEnv
// may be set beside uri). Any other attribute (manufacturer, model, library-*, slot-*,
// vendor attributes) is refused rather than ignored, since ignoring a selector could
// select another token or key. A field the URI sets must not be set separately too.
//
// The URI is parsed here rather than with github.com/stefanberger/go-pkcs11uri
// (v0.0.0-20230803200340-78284954bff6), which was checked and is unfit: its Validate
// rejects type=secret-key (its type regular expression has a typo, "secret-key}data"),
// it offers no way to list the attributes it parsed (so unknown selectors could not be
// refused), and it accepts signed slot-id values.

// moduleDirs are the directories searched, in order, for a URI's module-name: the
// p11-kit module directories of Debian, Fedora and /usr/local, and SoftHSM2's.
var moduleDirs = func() []string {
	triplet := map[string]string{"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu", "386": "i386-linux-gnu",
		"arm": "arm-linux-gnueabihf", "ppc64le": "powerpc64le-linux-gnu", "s390x": "s390x-linux-gnu", "riscv64": "riscv64-linux-gnu"}[runtime.GOARCH]
	var dirs []string
	if triplet != "" {
		dirs = append(dirs, "/usr/lib/"+triplet+"/pkcs11", "/usr/lib/"+triplet)
	}
	return append(dirs, "/usr/lib64/pkcs11", "/usr/lib/pkcs11", "/usr/local/lib/pkcs11", "/usr/lib/softhsm", "/usr/lib64")
}()

// uriFields are the Config fields a URI sets; empty strings and a nil slot are unset.
type uriFields struct {
	module, tokenLabel, tokenSerial, keyLabel, keyCKAID, pinFile string
	slot                                                         *uint
}

var (
	uriPathAttrs  = map[string]bool{"token": true, "serial": true, "slot-id": true, "object": true, "id": true, "type": true}
	uriQueryAttrs = map[string]bool{"module-path": true, "module-name": true, "pin-source": true, "pin-value": true}
)

// splitURIAttrs splits one part of a URI into attributes and percent-decodes their
// values. Errors never quote a value (pin-value may be in one).
func splitURIAttrs(part, sep, kind string, known map[string]bool) (map[string]string, error) {
	attrs := map[string]string{}
	if part == "" {
		return attrs, nil
	}
	for _, a := range strings.Split(part, sep) {
		name, value, ok := strings.Cut(a, "=")
		switch {
		case !ok || name == "":
			return nil, fmt.Errorf("malformed %s attribute %d: want name=value", kind, len(attrs)+1)
		case !known[name]:
			return nil, fmt.Errorf("%s attribute %q is not supported by hwkms (it selects the token only by token, serial or slot-id, the key by object and id, the module by module-path or module-name, the PIN by pin-source)", kind, name)
		}
		if _, dup := attrs[name]; dup {
			return nil, fmt.Errorf("%s attribute %q appears twice", kind, name)
		}
		v, err := url.PathUnescape(value)
		if err != nil {
			return nil, fmt.Errorf("%s attribute %q: invalid percent-encoding", kind, name)
		}
		attrs[name] = v
	}
	return attrs, nil
}

// parseURI parses an RFC 7512 pkcs11: URI into the fields it sets.
func parseURI(s string) (uriFields, error) {
	var u uriFields
	if len(s) < len("pkcs11:") || !strings.EqualFold(s[:len("pkcs11:")], "pkcs11:") {
		return u, errors.New(`not a PKCS#11 URI: must start with "pkcs11:"`)
	}
	rest := s[len("pkcs11:"):]
	if strings.Contains(rest, "#") {
		return u, errors.New("a PKCS#11 URI has no fragment (#)")
	}
	pathPart, queryPart, _ := strings.Cut(rest, "?")
	path, err := splitURIAttrs(pathPart, ";", "path", uriPathAttrs)
	if err != nil {
		return u, err
	}
	query, err := splitURIAttrs(queryPart, "&", "query", uriQueryAttrs)
	if err != nil {
		return u, err
	}
	if _, ok := query["pin-value"]; ok {
		return u, errors.New("pin-value is refused: hwkms reads the PIN only from a file (pin-source=file:/path, or pinFile) or an environment variable (pinEnv), never from the configuration itself")
	}

	var selectors []string
	for _, name := range []string{"token", "serial", "slot-id"} {
		if _, ok := path[name]; ok {
			selectors = append(selectors, name)
		}
	}
	if len(selectors) > 1 {
		return u, fmt.Errorf("exactly one of token, serial or slot-id may select the token; %s are set", strings.Join(selectors, " and "))
	}
	u.tokenLabel, u.tokenSerial = path["token"], path["serial"]
	if v, ok := path["slot-id"]; ok {
		if v == "" || strings.Trim(v, "0123456789") != "" {
			return u, fmt.Errorf("slot-id must be a decimal number, got %q", v)
		}
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil {
			return u, fmt.Errorf("slot-id %q: %w", v, err)
		}
		slot := uint(n)
		u.slot = &slot
	}
	for _, name := range []string{"token", "serial", "object", "id"} {
		if v, ok := path[name]; ok && v == "" {
			return u, fmt.Errorf("path attribute %q is empty", name)
		}
	}
	u.keyLabel = path["object"]
	if v, ok := path["id"]; ok {
		u.keyCKAID = hex.EncodeToString([]byte(v))
	}
	if v, ok := path["type"]; ok && v != "secret-key" {
		return u, fmt.Errorf(`type must be "secret-key" (hwkms keys are AES secret keys), got %q`, v)
	}

	modPath, hasPath := query["module-path"]
	modName, hasName := query["module-name"]
	switch {
	case hasPath && !filepath.IsAbs(modPath):
		return u, fmt.Errorf("module-path must be an absolute path, got %q", modPath)
	case hasName && (modName == "" || strings.ContainsRune(modName, '/')):
		return u, fmt.Errorf("module-name must be a library name without a directory, got %q", modName)
	case hasName:
		dirs := moduleDirs
		if hasPath {
			dirs = []string{modPath} // RFC 7512: module-path is then the directory to search
		}
		u.module, err = findModule(modName, dirs)
		if err != nil {
			return u, err
		}
	case hasPath:
		u.module = modPath
	}
	if v, ok := query["pin-source"]; ok {
		u.pinFile, err = pinSourcePath(v)
		if err != nil {
			return u, err
		}
	}
	return u, nil
}

// findModule returns the first of NAME, libNAME.so and NAME.so that is a regular file
// in one of dirs, searched in order.
func findModule(name string, dirs []string) (string, error) {
	for _, d := range dirs {
		for _, f := range []string{name, "lib" + name + ".so", name + ".so"} {
			p := filepath.Join(d, f)
			if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
				return p, nil
			}
		}
	}
	return "", fmt.Errorf("module-name %q: no %s, lib%s.so or %s.so in %s; set module-path to the module's absolute path",
		name, name, name, name, strings.Join(dirs, ", "))
}

// pinSourcePath accepts pin-source=file:/abs, file:///abs or /abs.
func pinSourcePath(v string) (string, error) {
	p := v
	switch {
	case strings.HasPrefix(v, "file://"):
		p = v[len("file://"):]
	case strings.HasPrefix(v, "file:"):
		p = v[len("file:"):]
	}
	if !filepath.IsAbs(p) {
		return "", errors.New("pin-source must be file: and an absolute path (file:/etc/hwkms/pin); other PIN sources are not supported")
	}
	return p, nil
}

// mergeURI returns c with the fields u sets, and the conflicts: attributes whose field
// is set separately too, each as "ATTRIBUTE and FIELD".
func (c Config) mergeURI(u uriFields) (Config, []string) {
	var conflicts []string
	set := func(attr string, have bool, field string, apply func()) {
		if !have {
			return
		}
		if field != "" {
			conflicts = append(conflicts, attr+" and "+field)
			return
		}
		apply()
	}
	sepSelector := ""
	switch {
	case c.TokenLabel != "":
		sepSelector = "tokenLabel"
	case c.TokenSerial != "":
		sepSelector = "tokenSerial"
	case c.Slot != nil:
		sepSelector = "slot"
	}
	ifSet := func(cond bool, name string) string {
		if cond {
			return name
		}
		return ""
	}
	set("module-path/module-name", u.module != "", ifSet(c.Module != "", "module"), func() { c.Module = u.module })
	set("token", u.tokenLabel != "", sepSelector, func() { c.TokenLabel = u.tokenLabel })
	set("serial", u.tokenSerial != "", sepSelector, func() { c.TokenSerial = u.tokenSerial })
	set("slot-id", u.slot != nil, sepSelector, func() { c.Slot = u.slot })
	set("object", u.keyLabel != "", ifSet(c.KeyLabel != "", "keyLabel"), func() { c.KeyLabel = u.keyLabel })
	set("id", u.keyCKAID != "", ifSet(c.KeyCKAID != "", "keyCKAID"), func() { c.KeyCKAID = u.keyCKAID })
	pinField := ifSet(c.PINFile != "", "pinFile")
	if c.PINEnv != "" {
		pinField = "pinEnv"
	}
	set("pin-source", u.pinFile != "", pinField, func() { c.PINFile = u.pinFile })
	c.URI = ""
	return c, conflicts
}

// validateURI reports, for Validate, a URI that does not parse or conflicts with the
// separate fields, and returns c with the URI's fields merged in so that Validate
// checks the result.
func (c Config) validateURI(bad func(name, format string, args ...any)) Config {
	if c.URI == "" {
		return c
	}
	u, err := parseURI(c.URI)
	if err != nil {
		bad("uri", "%v", err)
		return c
	}
	merged, conflicts := c.mergeURI(u)
	for _, cf := range conflicts {
		attr, field, _ := strings.Cut(cf, " and ")
		bad("uri", "%s in uri and the %s field are both set; use one of them", attr, field)
	}
	return merged
}

// Resolved returns c with the attributes of its URI moved into the separate fields
// (Module, TokenLabel, TokenSerial, Slot, KeyLabel, KeyCKAID, PINFile) and URI
// cleared, so that code reading the fields sees what the URI names. A config without
// URI, or whose URI does not parse or conflicts with a field, is returned unchanged
// (Validate reports why).
func (c Config) Resolved() Config {
	if c.URI == "" {
		return c
	}
	u, err := parseURI(c.URI)
	if err != nil {
		return c
	}
	merged, conflicts := c.mergeURI(u)
	if len(conflicts) > 0 {
		return c
	}
	return merged
}
