package hsm

import (
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

// chaos wraps the real module (through the p11 seam) and injects faults into every
// PKCS#11 call: a device that is down (every call answers one CK_RV), a persistent
// CK_RV from one function, one-shot CK_RVs, slow calls and hangs. Safe for concurrent
// use; faults can be changed while calls run.
type chaos struct {
	p11
	mu    sync.Mutex
	calls map[string]int
	down  uint                     // non-zero: every call answers this CK_RV
	fail  map[string]uint          // function -> CK_RV answered on every call
	once  map[string][]error       // function -> errors answered one per call
	delay map[string]time.Duration // function -> added latency
	hang  map[string]chan struct{} // function -> calls block until the channel closes
	// failAfter and onceAfter answer a CK_RV *after* the real call ran (every call, or
	// one per call), as a token that fails a C_Decrypt does: the failed call ends the
	// operation, so the session stays usable.
	failAfter map[string]uint
	onceAfter map[string][]uint
	hungIn    chan string // if set, told the name of every call that starts hanging
}

func newChaos() *chaos {
	return &chaos{
		calls:     map[string]int{},
		fail:      map[string]uint{},
		once:      map[string][]error{},
		delay:     map[string]time.Duration{},
		hang:      map[string]chan struct{}{},
		failAfter: map[string]uint{},
		onceAfter: map[string][]uint{},
	}
}

// pre is called before each forwarded call; a non-nil error is answered instead.
func (c *chaos) pre(name string) error {
	c.mu.Lock()
	c.calls[name]++
	if c.down != 0 {
		rv := c.down
		c.mu.Unlock()
		return pkcs11.Error(rv)
	}
	if rv := c.fail[name]; rv != 0 {
		c.mu.Unlock()
		return pkcs11.Error(rv)
	}
	if q := c.once[name]; len(q) > 0 {
		c.once[name] = q[1:]
		c.mu.Unlock()
		return q[0]
	}
	d, h, told := c.delay[name], c.hang[name], c.hungIn
	c.mu.Unlock()
	if d > 0 {
		time.Sleep(d)
	}
	if h != nil {
		if told != nil {
			select {
			case told <- name:
			default:
			}
		}
		<-h
	}
	return nil
}

func (c *chaos) set(fn func(c *chaos)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	fn(c)
}

// clear removes every persistent fault (down, fail, delay) and releases hangs.
func (c *chaos) clear() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.down = 0
	clear(c.fail)
	clear(c.delay)
	clear(c.failAfter)
	for name, h := range c.hang {
		close(h)
		delete(c.hang, name)
	}
}

func (c *chaos) count(name string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.calls[name]
}

func (c *chaos) Initialize(opts ...pkcs11.InitializeOption) error {
	if err := c.pre("Initialize"); err != nil {
		return err
	}
	return c.p11.Initialize(opts...)
}

func (c *chaos) Finalize() error {
	if err := c.pre("Finalize"); err != nil {
		return err
	}
	return c.p11.Finalize()
}

func (c *chaos) GetSlotList(tokenPresent bool) ([]uint, error) {
	if err := c.pre("GetSlotList"); err != nil {
		return nil, err
	}
	return c.p11.GetSlotList(tokenPresent)
}

func (c *chaos) GetTokenInfo(slotID uint) (pkcs11.TokenInfo, error) {
	if err := c.pre("GetTokenInfo"); err != nil {
		return pkcs11.TokenInfo{}, err
	}
	return c.p11.GetTokenInfo(slotID)
}

func (c *chaos) OpenSession(slotID uint, flags uint) (pkcs11.SessionHandle, error) {
	if err := c.pre("OpenSession"); err != nil {
		return 0, err
	}
	return c.p11.OpenSession(slotID, flags)
}

func (c *chaos) CloseSession(sh pkcs11.SessionHandle) error {
	if err := c.pre("CloseSession"); err != nil {
		return err
	}
	return c.p11.CloseSession(sh)
}

func (c *chaos) Login(sh pkcs11.SessionHandle, userType uint, pin string) error {
	if err := c.pre("Login"); err != nil {
		return err
	}
	return c.p11.Login(sh, userType, pin)
}

func (c *chaos) Logout(sh pkcs11.SessionHandle) error {
	if err := c.pre("Logout"); err != nil {
		return err
	}
	return c.p11.Logout(sh)
}

func (c *chaos) FindObjectsInit(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) error {
	if err := c.pre("FindObjectsInit"); err != nil {
		return err
	}
	return c.p11.FindObjectsInit(sh, temp)
}

func (c *chaos) FindObjects(sh pkcs11.SessionHandle, max int) ([]pkcs11.ObjectHandle, bool, error) {
	if err := c.pre("FindObjects"); err != nil {
		return nil, false, err
	}
	return c.p11.FindObjects(sh, max)
}

func (c *chaos) FindObjectsFinal(sh pkcs11.SessionHandle) error {
	if err := c.pre("FindObjectsFinal"); err != nil {
		return err
	}
	return c.p11.FindObjectsFinal(sh)
}

func (c *chaos) GetAttributeValue(sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, a []*pkcs11.Attribute) ([]*pkcs11.Attribute, error) {
	if err := c.pre("GetAttributeValue"); err != nil {
		return nil, err
	}
	return c.p11.GetAttributeValue(sh, o, a)
}

func (c *chaos) EncryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error {
	if err := c.pre("EncryptInit"); err != nil {
		return err
	}
	return c.p11.EncryptInit(sh, m, o)
}

func (c *chaos) Encrypt(sh pkcs11.SessionHandle, message []byte) ([]byte, error) {
	if err := c.pre("Encrypt"); err != nil {
		return nil, err
	}
	return c.p11.Encrypt(sh, message)
}

func (c *chaos) DecryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error {
	if err := c.pre("DecryptInit"); err != nil {
		return err
	}
	return c.p11.DecryptInit(sh, m, o)
}

func (c *chaos) Decrypt(sh pkcs11.SessionHandle, cipher []byte) ([]byte, error) {
	if err := c.pre("Decrypt"); err != nil {
		return nil, err
	}
	out, err := c.p11.Decrypt(sh, cipher)
	if rv := c.postRV("Decrypt"); rv != 0 {
		return nil, pkcs11.Error(rv)
	}
	return out, err
}

// postRV returns the CK_RV to answer after the real call, or 0.
func (c *chaos) postRV(name string) uint {
	c.mu.Lock()
	defer c.mu.Unlock()
	if rv := c.failAfter[name]; rv != 0 {
		return rv
	}
	if q := c.onceAfter[name]; len(q) > 0 {
		c.onceAfter[name] = q[1:]
		return q[0]
	}
	return 0
}

// EncryptOnce and DecryptOnce get the faults of Encrypt and Decrypt: they are the
// same C_Encrypt and C_Decrypt, made once with a caller-sized buffer.
func (c *chaos) EncryptOnce(sh pkcs11.SessionHandle, in []byte, outLen int) ([]byte, error) {
	if err := c.pre("Encrypt"); err != nil {
		return nil, err
	}
	return c.p11.EncryptOnce(sh, in, outLen)
}

func (c *chaos) DecryptOnce(sh pkcs11.SessionHandle, in []byte, outLen int) ([]byte, error) {
	if err := c.pre("Decrypt"); err != nil {
		return nil, err
	}
	out, err := c.p11.DecryptOnce(sh, in, outLen)
	if rv := c.postRV("Decrypt"); rv != 0 {
		clear(out)
		return nil, pkcs11.Error(rv)
	}
	return out, err
}
