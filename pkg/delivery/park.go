package delivery

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
)

// ParkedStream holds parked messages: those that cannot be appended as
// they are, and every later message of their group.
const ParkedStream = "PGS2_PARKED"

// ParkRoot is the subject root of parked messages:
// pgs2.parked.<sink>.<basin>.<stream>.<group hash>.
const ParkRoot = "pgs2.parked"

// Headers of a parked message, besides the delivery message's own.
const (
	HeaderDeliverySeq = "Pgs2-Delivery-Seq"
	HeaderParkReason  = "Pgs2-Park-Reason"
	HeaderParkedAt    = "Pgs2-Parked-At"
	HeaderSubject     = "Pgs2-Subject"
	HeaderS2Status    = "Pgs2-S2-Status"
	HeaderS2Code      = "Pgs2-S2-Code"
	HeaderAttempts    = "Pgs2-Attempts"
)

// DeadStream holds messages given up after retry.max_attempts, with their
// last error: never silently dropped.
const DeadStream = "PGS2_DEAD"

// DeadSubject is a unit's dead-letter subject.
func DeadSubject(u Unit) string {
	return "pgs2.dead." + bus.EscapeToken(u.Sink) + "." + bus.EscapeToken(u.Basin) + "." + bus.EscapeToken(u.Stream)
}

// ParkSubject is the park of one group of a unit.
func ParkSubject(u Unit, group string) string {
	return ParkRoot + "." + bus.EscapeToken(u.Sink) + "." + bus.EscapeToken(u.Basin) + "." + bus.EscapeToken(u.Stream) + "." + group
}

// parseParkSubject splits a park subject into its unit and group hash.
func parseParkSubject(subject string) (u Unit, group string, ok bool) {
	t := strings.Split(subject, ".")
	if len(t) != 6 || t[0]+"."+t[1] != ParkRoot {
		return Unit{}, "", false
	}
	return Unit{bus.UnescapeToken(t[2]), bus.UnescapeToken(t[3]), bus.UnescapeToken(t[4])}, t[5], true
}

// ParkFilter matches every park of a unit.
func ParkFilter(u Unit) string { return ParkSubject(u, "*") }

// EnsureParkedStream creates or updates the park stream. Parked messages
// stay until they are delivered or acknowledged by an operator.
func EnsureParkedStream(ctx context.Context, js jetstream.JetStream, replicas int) error {
	_, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:        ParkedStream,
		Description: "pgs2 parked messages: failed and held back in group order",
		Subjects:    []string{ParkRoot + ".>"},
		Storage:     jetstream.FileStorage,
		Replicas:    replicas,
		Duplicates:  time.Hour,
		AllowDirect: true,
	})
	if err != nil {
		return fmt.Errorf("create or update stream %s: %w", ParkedStream, err)
	}
	_, err = js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name: DeadStream, Description: "pgs2 messages given up after retry.max_attempts",
		Subjects: []string{"pgs2.dead.>"}, Storage: jetstream.FileStorage, Replicas: replicas, Duplicates: time.Hour,
	})
	if err != nil {
		return fmt.Errorf("create or update stream %s: %w", DeadStream, err)
	}
	return nil
}

// RetrySubject is where the admin API asks a unit's worker to retry its
// parked groups now.
func RetrySubject(u Unit) string {
	return "pgs2.admin.retry." + bus.EscapeToken(u.Sink) + "." + bus.EscapeToken(u.Basin) + "." + bus.EscapeToken(u.Stream)
}
