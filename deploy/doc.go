// Package deploy holds hwkms's deployment artifacts: a hardened systemd unit
// (systemd/hwkms.service), a static-pod manifest for kubeadm control planes
// (kubernetes/hwkms-static-pod.yaml), an EncryptionConfiguration
// (encryption-config.yaml), an example config (hwkms.yaml), and what the release
// artifacts are built from: packaging/nfpm.yaml and packaging/scripts (the .deb and
// .rpm of `make package`), packaging/image.json (the OCI image of `make image`, built by
// cmd/mkimage) and Containerfile (the same image, built with a container daemon). It has
// no code; its tests check that the files are valid and agree with each other, with
// the CLI and, given HWKMS_IMAGE, with the built image archive.
package deploy
