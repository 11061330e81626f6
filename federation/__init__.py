"""What both federated faces share: configuration, screening and defences, records, rounds, the client's job.

server.py (start_server) and server_app.py (Message API) adapt Flower's two strategy interfaces to
`rounds.Rounds`; client.py (NumPyClient) and client_app.py (Message API) wrap `participant.Participant`.
Nothing here imports Flower, so both faces get the same behaviour from the same lines.
"""
