package hsm

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestURIParse(t *testing.T) {
	dir := t.TempDir()
	lib := filepath.Join(dir, "libfakep11.so")
	if err := os.WriteFile(lib, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	slot := func(n uint) *uint { return &n }
	for _, tc := range []struct {
		name, uri string
		want      uriFields
		err       string // substring of the error; "" for success
	}{
		{name: "brief example",
			uri:  "pkcs11:token=k8s-kms;object=kek-2026;id=%01%02?module-path=/usr/lib/x.so&pin-source=file:/etc/hwkms/pin",
			want: uriFields{module: "/usr/lib/x.so", tokenLabel: "k8s-kms", keyLabel: "kek-2026", keyCKAID: "0102", pinFile: "/etc/hwkms/pin"}},
		{name: "percent-encoded id and label", uri: "pkcs11:token=my%20token;object=a%3Bb;id=%00%ff%41",
			want: uriFields{tokenLabel: "my token", keyLabel: "a;b", keyCKAID: "00ff41"}},
		{name: "literal id bytes", uri: "pkcs11:serial=0123abc;id=AB", want: uriFields{tokenSerial: "0123abc", keyCKAID: "4142"}},
		{name: "slot-id", uri: "pkcs11:slot-id=3;object=k;type=secret-key", want: uriFields{slot: slot(3), keyLabel: "k"}},
		{name: "file:// pin-source", uri: "pkcs11:token=t?pin-source=file:///run/pin", want: uriFields{tokenLabel: "t", pinFile: "/run/pin"}},
		{name: "plain path pin-source", uri: "pkcs11:token=t?pin-source=/run/pin", want: uriFields{tokenLabel: "t", pinFile: "/run/pin"}},
		{name: "module-name in module-path dir", uri: "pkcs11:token=t?module-name=fakep11&module-path=" + dir, want: uriFields{tokenLabel: "t", module: lib}},
		{name: "upper-case scheme", uri: "PKCS11:token=t", want: uriFields{tokenLabel: "t"}},
		{name: "empty", uri: "pkcs11:", want: uriFields{}},

		{name: "not a pkcs11 uri", uri: "file:/x", err: `must start with "pkcs11:"`},
		{name: "pin-value refused", uri: "pkcs11:token=t?pin-value=123456", err: "pin-value is refused"},
		{name: "pin-source program refused", uri: "pkcs11:token=t?pin-source=%7C/bin/pin", err: "pin-source must be file:"},
		{name: "relative pin-source", uri: "pkcs11:token=t?pin-source=file:pin", err: "pin-source must be file:"},
		{name: "two selectors", uri: "pkcs11:token=t;serial=s", err: "exactly one of token, serial or slot-id"},
		{name: "negative slot", uri: "pkcs11:slot-id=-1", err: "slot-id must be a decimal number"},
		{name: "huge slot", uri: "pkcs11:slot-id=99999999999", err: "slot-id"},
		{name: "bad percent", uri: "pkcs11:object=%zz", err: "invalid percent-encoding"},
		{name: "duplicate", uri: "pkcs11:object=a;object=b", err: "appears twice"},
		{name: "no value", uri: "pkcs11:object", err: "malformed path attribute"},
		{name: "unknown path attribute", uri: "pkcs11:token=t;manufacturer=SoftHSM", err: `"manufacturer" is not supported`},
		{name: "unknown query attribute", uri: "pkcs11:token=t?x-vendor=1", err: `"x-vendor" is not supported`},
		{name: "other type", uri: "pkcs11:object=k;type=private", err: `type must be "secret-key"`},
		{name: "empty id", uri: "pkcs11:object=k;id=", err: `"id" is empty`},
		{name: "relative module-path", uri: "pkcs11:token=t?module-path=lib/x.so", err: "module-path must be an absolute path"},
		{name: "module-name not found", uri: "pkcs11:token=t?module-name=nosuchmodule&module-path=" + dir, err: "no nosuchmodule, libnosuchmodule.so"},
		{name: "fragment", uri: "pkcs11:token=t#x", err: "no fragment"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseURI(tc.uri)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("parseURI = %+v, %v; want error %q", got, err, tc.err)
				}
				if strings.Contains(err.Error(), "123456") {
					t.Fatalf("error quotes the PIN: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseURI: %v", err)
			}
			if (got.slot == nil) != (tc.want.slot == nil) || got.slot != nil && *got.slot != *tc.want.slot {
				t.Fatalf("slot = %v, want %v", got.slot, tc.want.slot)
			}
			got.slot, tc.want.slot = nil, nil
			if got != tc.want {
				t.Fatalf("parseURI = %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestURIValidate(t *testing.T) {
	const uri = "pkcs11:token=k8s-kms;object=kek;id=%01?module-path=/usr/lib/x.so&pin-source=file:/etc/hwkms/pin"
	slot := uint(1)
	for _, tc := range []struct {
		name string
		cfg  Config
		want []string // substrings of the error; none for success
	}{
		{"uri alone", Config{URI: uri}, nil},
		{"uri with pinEnv", Config{URI: "pkcs11:token=t;object=k?module-path=/usr/lib/x.so", PINEnv: "PIN"}, nil},
		{"module twice", Config{URI: uri, Module: "/usr/lib/y.so"}, []string{"keys[0].pkcs11.uri: module-path/module-name in uri and the module field are both set"}},
		{"selector twice", Config{URI: uri, Slot: &slot}, []string{"keys[0].pkcs11.uri: token in uri and the slot field are both set"}},
		{"label twice", Config{URI: uri, KeyLabel: "kek"}, []string{"keys[0].pkcs11.uri: object in uri and the keyLabel field are both set"}},
		{"id twice", Config{URI: uri, KeyCKAID: "01"}, []string{"keys[0].pkcs11.uri: id in uri and the keyCKAID field are both set"}},
		{"pin twice", Config{URI: uri, PINEnv: "PIN"}, []string{"keys[0].pkcs11.uri: pin-source in uri and the pinEnv field are both set"}},
		{"pin-value", Config{URI: "pkcs11:token=t;object=k?module-path=/usr/lib/x.so&pin-value=secret", PINEnv: "PIN"}, []string{"keys[0].pkcs11.uri: pin-value is refused"}},
		{"uri without object", Config{URI: "pkcs11:token=t?module-path=/usr/lib/x.so", PINEnv: "PIN"}, []string{"keys[0].pkcs11.keyLabel: required"}},
		{"long token from uri", Config{URI: "pkcs11:object=k;token=" + strings.Repeat("a", 33) + "?module-path=/usr/lib/x.so", PINEnv: "PIN"}, []string{"keys[0].pkcs11.tokenLabel: longer than 32"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate("keys[0].pkcs11")
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				r := tc.cfg.Resolved()
				if r.URI != "" || r.Module == "" || r.TokenLabel == "" || r.KeyLabel == "" {
					t.Fatalf("Resolved = %+v, want the URI's fields and no URI", r)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate passed, want %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Fatalf("Validate = %v, want %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "secret") {
				t.Fatalf("error quotes the PIN: %v", err)
			}
			if r := tc.cfg.Resolved(); strings.Contains(tc.want[0], ".uri:") && r.URI != tc.cfg.URI {
				t.Fatalf("Resolved of an invalid config changed it: %+v", r)
			}
		})
	}
}

// TestURIOpenSoftHSM2 creates a key with separate fields and opens it by a URI naming
// module, token, object, id and PIN file.
func TestURIOpenSoftHSM2(t *testing.T) {
	fx, toks := newTokens(t, 1)
	cfg := cfgFor(fx, toks[0], "kek uri;1")
	ki := createKey(t, cfg)
	id := strings.ToUpper(ki.CKAID)
	var enc strings.Builder
	for i := 0; i < len(id); i += 2 {
		enc.WriteString("%" + id[i:i+2])
	}
	uri := "pkcs11:token=" + strings.ReplaceAll(toks[0].Label, " ", "%20") + ";object=kek%20uri%3B1;id=" + enc.String() +
		"?module-path=" + fx.Module + "&pin-source=file:" + toks[0].PINFile
	k := openKEK(t, Config{URI: uri})
	if k.ID() != ki.KeyID {
		t.Fatalf("Open by URI found %s, CreateKey made %s", k.ID(), ki.KeyID)
	}
	roundTrip(t, k, []byte("seed"), []byte("aad"))
	keys, err := ListKeys(context.Background(), Config{URI: uri})
	if err != nil || len(keys) != 1 {
		t.Fatalf("ListKeys by URI = %+v, %v", keys, err)
	}

	// module-name is looked up in moduleDirs (SoftHSM2's Debian directory among them).
	if m, err := findModule("softhsm2", moduleDirs); err != nil || m != fx.Module {
		t.Logf("module-name=softhsm2 resolves to %q (%v), not the fixture's %q: not checked", m, err, fx.Module)
	} else {
		byName := strings.Replace(uri, "module-path="+fx.Module, "module-name=softhsm2", 1)
		if keys, err := ListKeys(context.Background(), Config{URI: byName}); err != nil || len(keys) != 1 {
			t.Fatalf("ListKeys by module-name = %+v, %v", keys, err)
		}
	}

	// A URI naming another CKA_ID finds nothing.
	_, err = Open(context.Background(), Config{URI: strings.Replace(uri, "id="+enc.String(), "id=%00", 1)})
	if err == nil || !strings.Contains(err.Error(), "key not found") {
		t.Fatalf("Open by URI with another id: %v, want key not found", err)
	}
}
