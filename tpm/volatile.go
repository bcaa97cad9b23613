package tpm

import (
	"fmt"
	"slices"
)

// volatilePCRs are the PCRs that change, or can be reset, while the system runs,
// with what changes them. Sealing to one makes Unwrap fail (ErrPolicy) at the next
// change, not only after a firmware or boot change, so Config.PCRs refuses them
// unless Config.AllowVolatilePCRs is set. Sources: TCG PC Client Platform Firmware
// Profile (PCR usage; PCRs 16 and 23 resettable from locality 0, 17-22 reset by a
// dynamic launch), the Linux IMA documentation (PCR 10) and systemd's
// systemd-pcrphase(8) and systemd-cryptsetup (PCRs 11 and 15). The list is in
// doc.go, "PCR policy and recovery".
var volatilePCRs = map[int]string{
	10: "IMA extends it on every measured file access",
	11: "systemd-pcrphase extends it at boot milestones (enter-initrd, leave-initrd, sysinit, ready) and at shutdown",
	15: "systemd extends it with the machine ID, file system identities and unlocked volume keys as they come up",
	16: "the debug PCR: any process can reset it",
	17: "a dynamic launch (DRTM: Intel TXT, AMD SKINIT, Secure Launch) resets it",
	18: "a dynamic launch (DRTM) resets it",
	19: "a dynamic launch (DRTM) resets it",
	20: "a dynamic launch (DRTM) resets it",
	21: "a dynamic launch (DRTM) resets it",
	22: "a dynamic launch (DRTM) resets it",
	23: "the application PCR: any process can reset and extend it",
}

// checkVolatilePCRs refuses a PCR list that selects a volatile PCR; allowField
// names the field that would allow it. pcrs are already in range.
func checkVolatilePCRs(pcrs []int, allowField string) error {
	s := slices.Clone(pcrs)
	slices.Sort(s)
	for _, p := range s {
		if why, ok := volatilePCRs[p]; ok {
			return fmt.Errorf("PCR %d changes while the system runs (%s), so data sealed to it becomes unreadable; select stable PCRs (0-9, 12-14) or set %s: true", p, why, allowField)
		}
	}
	return nil
}
