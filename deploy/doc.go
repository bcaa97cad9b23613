// Package deploy holds hwkms's deployment artifacts: a hardened systemd unit
// (systemd/hwkms.service), a static-pod manifest for kubeadm control planes
// (kubernetes/hwkms-static-pod.yaml), an EncryptionConfiguration
// (encryption-config.yaml) and an example config (hwkms.yaml). It has no code; its
// tests check that the files are valid and agree with each other and with the CLI.
package deploy
