// Package metrics exports hwkms's Prometheus metrics and serves them, with the health
// endpoints, on an HTTP listener separate from the KMS socket.
//
// It owns: the metric definitions (all named hwkms_*, on a dedicated registry, never
// the global one), the plugin.Observer that records requests, device operations,
// probes and reloads, a collector that reads the serving keyring at scrape time (key
// info, PKCS#11 session pools and re-initialisations, TPM reconnects), the mapping
// of device errors to a bounded reason label, and the HTTP handler for /metrics,
// /healthz and /livez.
//
// It does not own the KMS service, the health probe itself (plugin.Service runs it and
// caches the result; /healthz only reads that cache), or any device access: nothing
// here ever calls a KEK's Wrap or Unwrap. It imports no backend: a device's reason
// names and its KEKs' statistics come in through Devices (cmd/hwkms serve passes
// plugin/config's DeviceReason and DeviceStats).
//
// Every label value comes from a fixed set (method names, gRPC codes, backend names,
// operation names, CKR_ and TPM_RC_ names, a few fixed words) or, for per-key series,
// from the 12-hex-digit SHA-256 prefix of a configured key_id: one value per key in the
// config. A raw key_id, an error message or any client input never becomes a label.
package metrics
