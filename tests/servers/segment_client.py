"""Sends events through Segment's own Python SDK (segment-analytics-python),
pointed at a Nudge server, exactly as an application would.

usage: segment_client.py HOST WRITE_KEY CUSTOMER
Prints one JSON line: the messageIds the SDK generated, and any errors."""

import json
import sys

import segment.analytics as analytics


def main():
    host, write_key, customer = sys.argv[1], sys.argv[2], sys.argv[3]
    errors = []
    analytics.write_key = write_key
    analytics.host = host
    analytics.gzip = True
    analytics.max_retries = 0
    analytics.on_error = lambda error, items: errors.append(repr(error))
    ids = []
    ok, msg = analytics.identify(customer, {
        "email": customer + "@example.com",
        "consent_email": True,
        "name": "SDK Customer",
    }, anonymous_id="anon-" + customer)
    ids.append(msg["messageId"])
    ok, msg = analytics.track(customer, "Deposit Made", {"amount": 25000.0})
    ids.append(msg["messageId"])
    # Only an anonymousId: accepted, not attributable to a customer.
    ok, msg = analytics.track(anonymous_id="anon-only", event="Page Viewed",
                              properties={"path": "/mortgages"})
    analytics.flush()
    analytics.shutdown()
    print(json.dumps({"message_ids": ids, "errors": errors}))


if __name__ == "__main__":
    main()
