"""The wire contract of each capability (request schema, rules, work payload, response
bodies, usage), shared by the API and the workers; ``base`` holds the rules they share."""
