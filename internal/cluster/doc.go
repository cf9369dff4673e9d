// Package cluster is courier's cluster runtime: what lets several courier
// processes (gateway, api and worker roles) share one set of backends.
//
// A Node is the gateway side of a process: it registers the gateway's
// connections in the shared session directory (Redis) with TTL'd
// heartbeats, listens on the node's NATS subject (courier.node.<id>) for
// "this device's mailbox has new entries", typing indicators and
// "this connection was superseded", and feeds the gateway's presence
// subscribers from the directory's presence events.
//
// A Worker is the delivery role: a durable JetStream consumer shared by all
// workers over the mailbox stream's device subjects. For each new entry it
// looks the device up in the directory and notifies the node that holds
// it, or, for a device that is not connected, hands a content-free wake-up
// to a Pusher (LogPusher, WebhookPusher). Notifications are hints: the
// mailbox is the source of truth, and a gateway streams it from the last
// seq it sent whenever it is poked and on every new connection, so a lost
// notification delays an entry until the next one, never loses it.
//
// docs/architecture.md ("Cluster") describes the subjects, the consumer,
// the directory keys and the failure behaviour.
package cluster
