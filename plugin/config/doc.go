// Package config owns the hwkms configuration file: its YAML schema, strict parsing
// (unknown fields are errors), validation whose every message names the field, and
// turning the list of keys into a plugin.Keyring by opening each key on its backend.
//
// It also owns the backend registry: the one layer that knows every backend. Each
// configured Key resolves (Key.Resolve) to a Backend that opens, creates, describes,
// rotates, destroys and checks (doctor) that key, so the commands never switch on the
// backend. Each backend is one file, backend_<name>.go, that registers itself; it also
// names its device errors (DeviceReason) and reads its KEKs' statistics (DeviceStats)
// for plugin/metrics, which imports no backend.
//
// It does not own device details (hsm and tpm validate their own blocks and speak
// their protocols) or serving (plugin). It sits above the backends so that plugin
// itself never imports one.
package config
