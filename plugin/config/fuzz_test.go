package config

import (
	"regexp"
	"strings"
	"testing"
)

// fieldLine is how every validation message starts: a field path and a colon.
var fieldLine = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9]*(\[\d+\])?(\.[A-Za-z][A-Za-z0-9]*(\[\d+\])?)*: `)

// FuzzParse: Parse never panics on any bytes, and every error either says parse (the
// YAML or a type did not decode) or is a list of lines each naming a field.
func FuzzParse(f *testing.F) {
	f.Add([]byte(validYAML))
	f.Add([]byte(validYAML + "timeout: 3x\n"))
	f.Add([]byte(validYAML + "health:\n  interval: 1ms\n"))
	f.Add([]byte("keys:\n  - tpm:\n      device: /dev/tpmrm0\n      persistentHandle: \"0x81010001\"\nsocket:\n  path: /x\n"))
	f.Add([]byte("keys: [{pkcs11: {}, tpm: {}}]\n"))
	f.Add([]byte("socket: [\n"))
	f.Add([]byte(""))
	f.Add([]byte("\x00\xff"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data)
		if err == nil {
			if c == nil || len(c.Keys) == 0 {
				t.Fatalf("Parse accepted a config without keys")
			}
			return
		}
		msg := err.Error()
		if strings.HasPrefix(msg, "parse: ") {
			return
		}
		for _, line := range strings.Split(msg, "\n") {
			if !fieldLine.MatchString(line) {
				t.Fatalf("error line %q names no field (whole error %q)", line, msg)
			}
		}
	})
}
