// Sends a file of Segment Spec events through a real Node SDK, with the
// SDK's default settings (batch size, flush interval, concurrency, retries),
// as a new user backfilling history through the API would.
//
//   node sdk_client.js segment|rudder URL WRITE_KEY EVENTS.jsonl
//
// Prints {"sent": N, "errors": [...]} on stdout once the SDK has flushed.
'use strict';

const fs = require('fs');

const [sdk, url, writeKey, file] = process.argv.slice(2);
if (!file) {
  console.error('usage: node sdk_client.js segment|rudder URL WRITE_KEY EVENTS.jsonl');
  process.exit(2);
}

const events = fs
  .readFileSync(file, 'utf8')
  .split('\n')
  .filter((l) => l.trim() !== '')
  .map((l) => JSON.parse(l));

const errors = [];

// Each SDK's call for one event, from the event's own fields.
function message(e) {
  const m = {
    userId: e.userId,
    messageId: e.messageId,
    timestamp: new Date(e.timestamp),
  };
  if (e.type === 'identify') m.traits = e.traits || {};
  else {
    m.event = e.event;
    m.properties = e.properties || {};
  }
  return m;
}

async function segment() {
  const { Analytics } = require('@segment/analytics-node');
  const analytics = new Analytics({ writeKey, host: url });
  analytics.on('error', (err) => errors.push(String(err && (err.reason || err.message || err))));
  for (const e of events) {
    if (e.type === 'identify') analytics.identify(message(e));
    else analytics.track(message(e));
  }
  await analytics.closeAndFlush({ timeout: 120000 });
}

async function rudder() {
  const Analytics = require('@rudderstack/rudder-sdk-node');
  const client = new Analytics(writeKey, {
    dataPlaneUrl: url,
    errorHandler: (err) => errors.push(String(err && (err.message || err))),
  });
  const pending = [];
  for (const e of events) {
    pending.push(
      new Promise((resolve) => {
        const done = (err) => {
          if (err) errors.push(String(err.message || err));
          resolve();
        };
        if (e.type === 'identify') client.identify(message(e), done);
        else client.track(message(e), done);
      }),
    );
    // This SDK measures its whole queue on every call and drops calls past
    // its internal queue size: a backfill lets the flushes drain it, as a
    // script feeding it from a file would.
    while (client.queue.length >= 10 * client.flushAt) {
      await new Promise((resolve) => setTimeout(resolve, 1));
    }
  }
  // What is left under one batch goes at the flush interval; do not wait.
  while (client.queue.length > 0) {
    await new Promise((resolve) => client.flush(resolve));
  }
  await Promise.all(pending);
}

const run = sdk === 'segment' ? segment : sdk === 'rudder' ? rudder : null;
if (!run) {
  console.error(`unknown SDK ${sdk}`);
  process.exit(2);
}
run().then(
  () => {
    process.stdout.write(JSON.stringify({ sent: events.length, errors }) + '\n');
    // Timers an SDK leaves behind (flush intervals) must not keep us.
    process.exit(0);
  },
  (err) => {
    console.error(err && err.stack ? err.stack : String(err));
    process.exit(1);
  },
);
