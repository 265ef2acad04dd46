X = 'api'
