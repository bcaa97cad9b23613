// Package config owns the hwkms configuration file: its YAML schema, strict parsing
// (unknown fields are errors), validation whose every message names the field, and
// turning the list of keys into a plugin.Keyring by opening each key on its backend.
//
// It does not own device details (hsm and tpm validate their own blocks) or serving
// (plugin). It sits above the backends so that plugin itself never imports one.
package config
