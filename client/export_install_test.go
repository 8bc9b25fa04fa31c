package client

// AcceptSerial records serial as accepted for pkg, as a successful
// Install of a manifest of that serial does.
func AcceptSerial(c *Client, pkg string, serial uint64) error { return c.accept(pkg, serial) }
