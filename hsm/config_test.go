package hsm

import (
	"strings"
	"testing"
)

func TestConfigValidate(t *testing.T) {
	slot := uint(3)
	ok := Config{Module: "/usr/lib/softhsm/libsofthsm2.so", TokenLabel: "t", PINFile: "/run/pin", KeyLabel: "kek"}
	tests := []struct {
		name   string
		mutate func(*Config)
		want   []string // substrings of the error; nil means valid
	}{
		{"valid", func(c *Config) {}, nil},
		{"valid serial env", func(c *Config) { c.TokenLabel, c.TokenSerial, c.PINFile, c.PINEnv = "", "abc", "", "PIN" }, nil},
		{"valid slot", func(c *Config) { c.TokenLabel, c.Slot = "", &slot }, nil},
		{"valid ckaid and sessions", func(c *Config) { c.KeyCKAID, c.Sessions = "0aFF", 64 }, nil},
		{"no module", func(c *Config) { c.Module = "" }, []string{"p.module: required"}},
		{"relative module", func(c *Config) { c.Module = "libsofthsm2.so" }, []string{"p.module: must be an absolute path"}},
		{"no token selector", func(c *Config) { c.TokenLabel = "" }, []string{"p.tokenLabel: exactly one of tokenLabel, tokenSerial or slot is required"}},
		{"label and serial", func(c *Config) { c.TokenSerial = "s" }, []string{"p.tokenSerial: exactly one", "tokenLabel and tokenSerial are set"}},
		{"label and slot", func(c *Config) { c.Slot = &slot }, []string{"p.slot: exactly one"}},
		{"all three", func(c *Config) { c.Slot, c.TokenSerial = &slot, "s" }, []string{"tokenLabel and tokenSerial and slot are set"}},
		{"long token label", func(c *Config) { c.TokenLabel = strings.Repeat("x", 33) }, []string{"p.tokenLabel: longer than 32"}},
		{"no PIN source", func(c *Config) { c.PINFile = "" }, []string{"p.pinFile: exactly one of pinFile or pinEnv is required"}},
		{"two PIN sources", func(c *Config) { c.PINEnv = "PIN" }, []string{"p.pinEnv: exactly one of pinFile or pinEnv may be set"}},
		{"bad env name", func(c *Config) { c.PINFile, c.PINEnv = "", "A=B" }, []string{"p.pinEnv: is not a valid"}},
		{"no key label", func(c *Config) { c.KeyLabel = "" }, []string{"p.keyLabel: required"}},
		{"NUL in key label", func(c *Config) { c.KeyLabel = "a\x00b" }, []string{"p.keyLabel: must not contain a NUL"}},
		{"odd hex", func(c *Config) { c.KeyCKAID = "abc" }, []string{"p.keyCKAID: not an even-length hex"}},
		{"not hex", func(c *Config) { c.KeyCKAID = "zz" }, []string{"p.keyCKAID"}},
		{"negative sessions", func(c *Config) { c.Sessions = -1 }, []string{"p.sessions: must be between 1 and 64"}},
		{"too many sessions", func(c *Config) { c.Sessions = 65 }, []string{"p.sessions"}},
		{"several problems", func(c *Config) { c.Module, c.KeyLabel = "", "" }, []string{"p.module", "p.keyLabel"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := ok
			tt.mutate(&c)
			err := c.Validate("p")
			if tt.want == nil {
				if err != nil {
					t.Fatalf("Validate = %v, want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate = nil, want %q", tt.want)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Validate = %q, want it to contain %q", err, w)
				}
			}
		})
	}
	if err := (Config{}).Validate(""); err == nil || !strings.HasPrefix(err.Error(), "module: ") {
		t.Errorf("Validate with no prefix = %v, want field names without a leading dot", err)
	}
	if err := ok.Validate("keys[0].pkcs11"); err != nil {
		t.Fatal(err)
	}
	c := ok
	c.TokenLabel = ""
	if err := c.Validate("keys[0].pkcs11"); err == nil || !strings.HasPrefix(err.Error(), "keys[0].pkcs11.tokenLabel: ") {
		t.Errorf("Validate = %v, want keys[0].pkcs11.tokenLabel prefix", err)
	}
}
