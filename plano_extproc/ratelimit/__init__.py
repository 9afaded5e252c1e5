"""Plano ``ratelimits``: token budgets per model and request-header selector.

``budget`` holds the token-bucket arithmetic; ``memory`` the budgets every worker of one
gateway shares; ``redis_store`` the budgets every replica shares; ``estimate`` the prompt's
token estimate; ``limiter`` maps a request to its budgets and settles them after the reply.
"""
