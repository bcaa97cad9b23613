package config

import (
	"strings"
	"testing"
)

const uriYAML = `
socket:
  path: /run/hwkms/kms.sock
keys:
  - pkcs11:
      uri: "pkcs11:token=k8s-kms;object=kek-2026;id=%01%02?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/hwkms/pin"
      initArgs: "configdir='sql:/var/lib/nssdb' flags="
`

// TestParsePKCS11URI: a key named by uri parses, its backend sees the URI's fields,
// and uri errors name keys[0].pkcs11.uri.
func TestParsePKCS11URI(t *testing.T) {
	c, err := Parse([]byte(uriYAML))
	if err != nil {
		t.Fatal(err)
	}
	p, ok := c.Keys[0].resolved().(pkcs11Key)
	if !ok {
		t.Fatalf("backend %T, want pkcs11Key", c.Keys[0].resolved())
	}
	if p.c.Module != "/usr/lib/softhsm/libsofthsm2.so" || p.c.TokenLabel != "k8s-kms" || p.c.KeyLabel != "kek-2026" ||
		p.c.KeyCKAID != "0102" || p.c.PINFile != "/etc/hwkms/pin" || p.c.URI != "" || p.c.InitArgs == "" {
		t.Fatalf("backend config %+v, want the URI's fields and the initArgs", p.c)
	}
	for _, tc := range []struct{ name, from, to, want string }{
		{"pin-value", "pin-source=file:/etc/hwkms/pin", "pin-value=1234", "keys[0].pkcs11.uri: pin-value is refused"},
		{"uri and keyLabel", `initArgs:`, "keyLabel: other\n      initArgs:", "keys[0].pkcs11.uri: object in uri and the keyLabel field are both set"},
		{"not a uri", `"pkcs11:`, `"pkcs12:`, `keys[0].pkcs11.uri: not a PKCS#11 URI`},
		{"NUL in initArgs", `flags="`, `flags=\u0000"`, "keys[0].pkcs11.initArgs: must not contain a NUL byte"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(strings.Replace(uriYAML, tc.from, tc.to, 1)))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Parse = %v, want %q", err, tc.want)
			}
			if strings.Contains(err.Error(), "1234") {
				t.Fatalf("error quotes the PIN: %v", err)
			}
		})
	}
}
