package bus

import "time"

// The limits capture and router put on batches and rounds.
const (
	// MaxBatchEntries is an S2 append's records: a larger batch would be
	// split by delivery anyway.
	MaxBatchEntries = 1000
	// MaxBatchBytes caps a batch's body (and never above the NATS server's
	// max_payload, which the publishers check).
	MaxBatchBytes = 1 << 20
	// MaxRoundBytes caps a round's batches together.
	MaxRoundBytes = 16 << 20
	// MaxRoundAge bounds a round while its writer catches up on a backlog.
	MaxRoundAge = 50 * time.Millisecond
)

// Round collects entries into one batch per subject (more when one fills
// up) for publishing together. Its messages keep the order in which they
// were opened, so the same entries added in the same order always make the
// same messages: a publisher that died in the middle of a round can
// rebuild it and publish only the messages the stream lacks.
type Round struct {
	maxEntries, maxBytes int

	open    map[string]*RoundMsg // subject → its batch being filled
	msgs    []*RoundMsg
	free    []*RoundMsg
	entries int
	bytes   int
}

// RoundMsg is one message of a round.
type RoundMsg struct {
	Subject string
	Batch   BatchBuilder
	// LastKey is the key of the batch's last entry.
	LastKey string
}

// NewRound returns a round whose batches hold at most maxEntries entries
// and maxBytes bytes (one larger entry gets a batch of its own).
func NewRound(maxEntries, maxBytes int) *Round {
	return &Round{maxEntries: maxEntries, maxBytes: maxBytes, open: map[string]*RoundMsg{}}
}

// Add appends e (copied) to subject's batch.
func (r *Round) Add(subject string, e *Entry) {
	m := r.open[subject]
	if m != nil && (m.Batch.Len() >= r.maxEntries || m.Batch.Size()+e.Size() > r.maxBytes) {
		m = nil // full: it stays in the round, a new one follows it
	}
	if m == nil {
		if n := len(r.free); n > 0 {
			m, r.free = r.free[n-1], r.free[:n-1]
		} else {
			m = &RoundMsg{}
		}
		m.Subject = subject
		r.open[subject] = m
		r.msgs = append(r.msgs, m)
	}
	before := m.Batch.Size()
	m.Batch.Add(e)
	m.LastKey = string(e.Key)
	r.entries++
	r.bytes += m.Batch.Size() - before
}

// Msgs are the round's messages in publishing order.
func (r *Round) Msgs() []*RoundMsg { return r.msgs }

// Entries is the number of entries added since the last Reset.
func (r *Round) Entries() int { return r.entries }

// Bytes is the encoded size of the round.
func (r *Round) Bytes() int { return r.bytes }

// Reset empties the round, keeping its buffers.
func (r *Round) Reset() {
	for _, m := range r.msgs {
		m.Batch.Reset()
		r.free = append(r.free, m)
	}
	clear(r.open)
	r.msgs = r.msgs[:0]
	r.entries, r.bytes = 0, 0
}
