package main

import "github.com/rs/zerolog"

// natsLogger bridges the embedded NATS server's logger to zerolog.
type natsLogger struct{ l zerolog.Logger }

func (n natsLogger) Noticef(f string, a ...any) { n.l.Info().Msgf(f, a...) }
func (n natsLogger) Warnf(f string, a ...any)   { n.l.Warn().Msgf(f, a...) }
func (n natsLogger) Fatalf(f string, a ...any)  { n.l.Error().Msgf(f, a...) }
func (n natsLogger) Errorf(f string, a ...any)  { n.l.Error().Msgf(f, a...) }
func (n natsLogger) Debugf(f string, a ...any)  { n.l.Debug().Msgf(f, a...) }
func (n natsLogger) Tracef(f string, a ...any)  { n.l.Trace().Msgf(f, a...) }
