package capture

import (
	"net/url"
	"strconv"
)

// embeddedPort is the port of nats.url for an embedded server (4222 when unset).
func embeddedPort(u string) int {
	if pu, err := url.Parse(u); err == nil && pu.Port() != "" {
		if p, err := strconv.Atoi(pu.Port()); err == nil {
			return p
		}
	}
	return 4222
}
