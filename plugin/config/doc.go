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
// It also owns the primary-key History (history.go): the ordered key_ids that have been
// primary, kept in Config.StateDir as a versioned JSON file, so that serve and every
// reload refuse a replaced key_id as primary across restarts (kube-apiserver requires
// that a key_id is never reused). Reloader applies it at every reload.
//
// It does not own device details (hsm and tpm validate their own blocks and speak
// their protocols) or serving (plugin). It sits above the backends so that plugin
// itself never imports one.
package config
