"""Job state and what is stored: the database (engine, sessions, migrations, tables), file
objects, pagination, usage records and the rules of stored strings."""
