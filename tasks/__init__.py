X = 'tasks'
