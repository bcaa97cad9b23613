package config

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/tpm"
)

func init() {
	register(backendType{
		kind: kek.BackendTPM,
		of: func(k Key) Backend {
			if k.TPM == nil {
				return nil
			}
			return tpmKey{*k.TPM}
		},
		validate: func(k Key, prefix string) error { return k.TPM.Validate(prefix) },
		reason: func(err error) string {
			if name := tpm.Reason(err); strings.HasPrefix(name, "TPM_RC_") {
				return name
			}
			if errors.Is(err, tpm.ErrPolicy) {
				return "policy"
			}
			return ""
		},
		stats: func(k kek.KEK, s *Stats) {
			if r, ok := k.(interface{ Reconnects() uint64 }); ok {
				s.HasReconnects, s.Reconnects = true, r.Reconnects()
			}
		},
	})
}

// tpmKey is a KEK in a TPM 2.0 (package tpm).
type tpmKey struct{ c tpm.Config }

var _ Backend = tpmKey{}

// TPMKey returns the Key of a TPM KEK given by device and blob file or persistent
// handle (key destroy of a key no longer in the config). An empty device is the device
// of cfg's first tpm key, if any.
func TPMKey(cfg *Config, device, blobFile, handle string) Key {
	c := tpm.Config{Device: device, BlobFile: blobFile, PersistentHandle: handle}
	for _, k := range cfg.Keys {
		if t, ok := k.resolved().(tpmKey); ok && c.Device == "" {
			c.Device = t.c.Device
		}
	}
	return Key{TPM: &c}
}

// TPMLocation says where a TPM KEK is kept: "persistent handle 0x81010010" or
// "blob file PATH".
func TPMLocation(info tpm.KeyInfo) string {
	if info.Handle != "" {
		return "persistent handle " + info.Handle
	}
	return "blob file " + info.BlobFile
}

func (t tpmKey) Name() string { return kek.BackendTPM.String() }

func (t tpmKey) Open(ctx context.Context) (kek.KEK, error) {
	k, err := tpm.Open(ctx, t.c)
	if err != nil {
		return nil, err
	}
	return k, nil
}

func (t tpmKey) Create(ctx context.Context) (Created, error) {
	info, err := tpm.CreateKey(ctx, t.c)
	if err != nil {
		return Created{}, err
	}
	c := t.c
	return Created{KeyID: info.KeyID, Where: "in TPM " + c.Device + ": " + TPMLocation(info), Key: Key{TPM: &c}}, nil
}

func (t tpmKey) Describe(ctx context.Context) Description {
	info, err := tpm.Probe(ctx, t.c)
	if err != nil {
		return Description{KeyID: "-", Detail: err.Error(), Err: err}
	}
	return Description{KeyID: info.KeyID, Present: true, Detail: TPMLocation(info), Where: "TPM " + t.c.Device + " " + TPMLocation(info),
		DestroyEffect: destroyEffect(info, formOf(info))}
}

// kekForm is what a TPM KEK's attributes say about where else it can exist.
type kekForm int

const (
	// formMadeHere: fixedTPM set (hwkms key create): made in this TPM, its private
	// part never left it in the clear; its blob loads only under this TPM's SRK.
	formMadeHere kekForm = iota
	// formImported: fixedTPM clear (hwkms key import): made outside this TPM by a
	// ceremony that wrote import blobs for several nodes' TPMs and maybe an escrow blob.
	formImported
)

// formOf reads the form from the KEK's fixedTPM attribute, which tpm.Probe reports
// for both a blob file and a persistent handle.
func formOf(info tpm.KeyInfo) kekForm {
	if info.FixedTPM {
		return formMadeHere
	}
	return formImported
}

// destroyEffect says what key destroy does for a KEK of this location and form.
func destroyEffect(info tpm.KeyInfo, form kekForm) string {
	imported := " It is an imported KEK (fixedTPM clear): every other TPM that imported one of its import blobs holds the same KEK, and so does its escrow blob, if one was made; data encrypted under it stays readable wherever a copy is left."
	if info.Handle != "" {
		evict := "This evicts persistent handle " + info.Handle + " from this TPM."
		if form == formImported {
			return evict + imported
		}
		return evict + " The KEK was made here by hwkms key create (fixedTPM): no other copy was written, and everything encrypted under it becomes unreadable, forever."
	}
	del := "This deletes the blob file " + info.BlobFile + ", which removes this copy of the KEK. Anyone with another copy of the blob (a backup, a restored disk) and this TPM's owner SRK can still load it: the KEK is gone only when every copy of the blob is gone or the owner hierarchy is cleared (TPM2_Clear)."
	if form == formImported {
		return del + imported
	}
	return del
}

// presentDetail is doctor's "key present" detail: what the KEK's attributes say
// about where it can exist.
func presentDetail(info tpm.KeyInfo, form kekForm) string {
	switch {
	case form == formMadeHere && info.Handle != "":
		return "key_id " + info.KeyID + "; made in this TPM (fixedTPM|fixedParent) at persistent handle " + info.Handle + ": its private part cannot be exported, and no copy of it was written outside this TPM"
	case form == formMadeHere:
		return "key_id " + info.KeyID + "; made in this TPM (fixedTPM|fixedParent): its private part cannot be exported, and its blob loads only under this TPM's owner SRK"
	default: // formImported
		return "key_id " + info.KeyID + "; imported (fixedTPM clear): made outside this TPM for several nodes; the same KEK is in every TPM that imported its import blobs, and in its escrow blob if one was made; its no-duplication policy keeps this TPM from exporting it again"
	}
}

func (t tpmKey) Is(ctx context.Context, keyID string) (bool, error) {
	info, err := tpm.Probe(ctx, t.c)
	switch {
	case errors.Is(err, kek.ErrKeyNotFound), errors.Is(err, fs.ErrNotExist):
		return false, nil
	case err != nil:
		return false, err
	}
	return info.KeyID == keyID, nil
}

func (t tpmKey) Rotate(ctx context.Context, o RotateOptions) (Created, error) {
	c := t.c
	c.KeyID = "" // pins the primary, not the new key; srkName (same TPM) stays
	switch {
	case c.PersistentHandle != "":
		if o.PersistentHandle == "" {
			return Created{}, errors.New("the primary uses a persistent handle; pass --persistent-handle for the new key")
		}
		c.PersistentHandle = o.PersistentHandle
	default:
		c.BlobFile = o.BlobFile
		if c.BlobFile == "" {
			c.BlobFile = filepath.Join(filepath.Dir(t.c.BlobFile), "kek-"+o.Stamp+".blob")
		}
	}
	created, err := tpmKey{c}.Create(ctx)
	if err != nil {
		return Created{}, fmt.Errorf("create key in the primary's TPM: %w", err)
	}
	return created, nil
}

func (t tpmKey) Destroy(ctx context.Context) error { return tpm.DestroyKey(ctx, t.c) }

func (t tpmKey) Check(ctx context.Context, r Checker, o CheckOptions) {
	c, name := t.c, o.Name
	field := fmt.Sprintf("keys[%d].tpm", o.Index)
	dev := c.Device
	if dev == "" {
		dev = tpm.DefaultDevice
	}
	cctx, cancel := context.WithTimeout(ctx, o.Timeout)
	err := tpm.CheckDevice(cctx, c)
	cancel()
	if err != nil {
		r.Fail(name+" TPM reachable", err.Error(), "check "+field+".device; for /dev/tpmrm0 the hwkms user needs the tss group (and DeviceAllow= under systemd); for swtpm, that it runs")
		return
	}
	r.OK(name+" TPM reachable", dev)
	if strings.HasPrefix(dev, "/dev/") && os.Geteuid() == 0 {
		if ok, group := permitsRW(dev); !ok {
			r.Warn(name+" TPM permissions", dev+" is reachable here only because root bypasses file permissions (CAP_DAC_OVERRIDE); the shipped systemd unit drops every capability, so serve would get \"permission denied\"",
				"keep SupplementaryGroups="+group+" in the unit (or run hwkms as a user in group "+group+")")
		}
	}
	if len(c.PCRs) > 0 {
		cctx, cancel := context.WithTimeout(ctx, o.Timeout)
		err := tpm.CheckPCRs(cctx, c)
		cancel()
		if err != nil {
			r.Fail(name+" PCRs readable", err.Error(), "enable the SHA-256 PCR bank in firmware or remove "+field+".pcrs")
			return
		}
		r.OK(name+" PCRs readable", fmt.Sprintf("SHA-256 PCRs %v", c.PCRs))
	}
	cctx, cancel = context.WithTimeout(ctx, o.Timeout)
	info, err := tpm.Probe(cctx, c)
	cancel()
	switch {
	case errors.Is(err, kek.ErrKeyNotFound):
		r.Fail(name+" key present", err.Error(), fmt.Sprintf("hwkms key create --config %s --key %d", o.ConfigPath, o.Index))
		return
	case errors.Is(err, tpm.ErrKeyIDMismatch):
		r.Fail(name+" key present", err.Error(), "another key is at "+field+"'s handle or blob file than "+field+".keyID pins: find out who put it there before changing keyID")
		return
	case errors.Is(err, tpm.ErrSRKMismatch):
		r.Fail(name+" key present", err.Error(), "the TPM's owner SRK is not the one "+field+".srkName pins (or not an SRK at all): a cleared owner hierarchy, another TPM, or something answering in the TPM's place; compare with hwkms tpm export-srk run where the bus is trusted")
		return
	case errors.Is(err, tpm.ErrNotKEK):
		r.Fail(name+" key present", err.Error(), "point "+field+" at a KEK made by hwkms key create (fixedTPM|fixedParent storage key)")
		return
	case err != nil:
		r.Fail(name+" key present", err.Error(), "")
		return
	}
	r.OK(name+" key present", presentDetail(info, formOf(info)))
	if o.SocketServed && !strings.HasPrefix(filepath.Base(dev), "tpmrm") {
		r.Warn(name+" round trip", "skipped: "+dev+" has no resource manager and another process serves the socket; opening the key would flush that process's TPM handles", "stop the running hwkms first")
		return
	}
	cctx, cancel = context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	k, err := tpm.Open(cctx, c)
	if err != nil {
		r.Fail(name+" round trip", err.Error(), "check "+field+".authFile (wrong auth gives TPM_RC_BAD_AUTH) and, with pcrs, whether the PCRs changed since the data was sealed")
		return
	}
	defer k.Close()
	roundTrip(cctx, r, name, k)
}

// permitsRW reports whether path's permission bits give this process read and write
// access without any capability: by owner, group (effective or supplementary) or
// others. group names the file's group, for advice.
func permitsRW(path string) (ok bool, group string) {
	fi, err := os.Stat(path)
	if err != nil {
		return true, "" // CheckDevice already opened it; nothing to say
	}
	st, isUnix := fi.Sys().(*syscall.Stat_t)
	if !isUnix {
		return true, ""
	}
	group = strconv.Itoa(int(st.Gid))
	if g, err := user.LookupGroupId(group); err == nil {
		group = g.Name
	}
	perm := fi.Mode().Perm()
	var bits fs.FileMode
	switch {
	case int(st.Uid) == os.Geteuid():
		bits = perm >> 6
	case inGroup(int(st.Gid)):
		bits = perm >> 3
	default:
		bits = perm
	}
	return bits&0o6 == 0o6, group
}

func inGroup(gid int) bool {
	if gid == os.Getegid() {
		return true
	}
	groups, _ := os.Getgroups()
	return slices.Contains(groups, gid)
}
