package client

// DisablePings stops c from pinging, so that only the server's probes and
// the client's echoes keep its links alive.
func DisablePings(c *Client) { c.noPings = true }
