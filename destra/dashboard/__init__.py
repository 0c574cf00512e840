"""``destra dashboard``: a web dashboard of the network (tasks, operators, the network's
health, governance), read from the Postgres views and a few Kafka topics, live by
server-sent events. ``hub`` reads, ``pages`` renders, ``app`` serves, ``cli`` starts it."""
